"""What a run was made with (cac.exp.provenance): the stack's versions, the device, the source tree,
and the one line a report adds when its rows were made with different ones."""
from types import SimpleNamespace

import pytest

from cac.exp.provenance import dataset_input, run_tags, version_spread, versions
from cac.exp.results import run_versions, versions_note


def _run(**tags):
    return SimpleNamespace(data=SimpleNamespace(tags=tags))


def test_versions_name_every_package_and_mmcv_ops():
    import importlib.metadata

    v = versions()
    assert v["env.mmseg"] == importlib.metadata.version("mmsegmentation") and v["env.mmcv_ops"] == "compiled"
    assert set(v) >= {"env.torch", "env.mmcv", "env.mmengine", "env.mlflow", "env.cac", "env.python"}
    tags = run_tags()
    assert tags["mlflow.source.type"] == "LOCAL" and len(tags.get("mlflow.source.git.commit", "")) == 40
    assert tags["mlflow.source.git.dirty"] in ("true", "false") and tags["env.device"]


def test_a_report_names_the_rows_made_with_other_versions():
    same = {"env.torch": "2.13.0", "env.device": "cpu", "mlflow.source.git.commit": "a" * 40}
    runs = {"(a)": {0: _run(**same), 1: _run(**same)}, "(f)": {0: _run(**same)}}
    assert versions_note(runs) == [] and run_versions(runs) == same
    runs["(f)"][1] = _run(**{**same, "env.torch": "2.12.1", "mlflow.source.git.commit": "b" * 40})
    (note,) = versions_note(runs)
    assert "torch: 2.12.1 in (f); 2.13.0 in (a), (f)" in note and "git commit: aaaaaaaaaaaa in (a), (f); bbbbbbbbbbbb in (f)" in note
    assert "env.torch" not in run_versions(runs) and run_versions(runs)["env.device"] == "cpu"
    assert version_spread([]) == []


def test_dataset_input_names_the_data_version():
    data = dataset_input("ade20k-subset-train6-val2", "ade20k-subset-train6-val2", "/data/ade")
    assert data.dataset.name == "ade20k-subset-train6-val2" and data.dataset.source == "/data/ade"
    assert len(data.dataset.digest) == 8 and data.tags[0].value == "training"


def test_a_dataset_insert_lost_to_another_run_is_retried_and_other_errors_are_not():
    """Two runs starting together on a shared PostgreSQL store both inserted the same dataset; the
    later one failed its trial (seen in CI: psycopg UniqueViolation on ``dataset_pk``). The tracker
    retries such a refusal (the dataset exists by then) and raises anything else at once."""
    from mlflow.exceptions import MlflowException

    from cac.exp.tracking import retry_on_duplicate

    calls = []

    def lost_once():
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique '
                                  'constraint "dataset_pk"')
        return "linked"

    assert retry_on_duplicate(lost_once) == "linked" and len(calls) == 2
    calls.clear()

    def broken():
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run 0123 not found")

    with pytest.raises(MlflowException, match="not found"):
        retry_on_duplicate(broken)
    assert len(calls) == 1

    def always_lost():
        calls.append(1)
        raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")

    calls.clear()
    with pytest.raises(MlflowException, match="UNIQUE"):
        retry_on_duplicate(always_lost, tries=3)
    assert len(calls) == 3


def test_a_process_names_the_commit_of_the_code_it_imported_for_every_run(tmp_path):
    """One `cac-exp` process runs many units with the code it imported; a commit made while it runs
    must not be named by its later runs. A copy of this checkout (git clone), a process that reads
    the source tree, a commit in between, and the process reads it again."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(root), str(clone)], check=True)
    shutil.copytree(root / "cac", clone / "cac", dirs_exist_ok=True)  # the code under test, committed or not
    probe = ("import subprocess, sys\n"
             "from cac.exp.provenance import source_tree\n"
             "from cac.exp.tracking import git_commit\n"
             "first = source_tree()['mlflow.source.git.commit']\n"
             "subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '--allow-empty',"
             " '-m', 'later'], check=True)\n"
             "print(first, source_tree()['mlflow.source.git.commit'], git_commit(),"
             " subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip())\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=clone, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(clone), "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    first, again, commit, head = out.stdout.split()
    assert first == again == commit != head  # the later commit is the checkout's, not the process's


def test_the_source_tags_are_the_checkouts_commit_and_state(tmp_path, monkeypatch):
    """Against a checkout of two commits: the commit is HEAD's (not an older one), the branch is named,
    and the tree is clean until a tracked file changes, or an untracked source file appears (a module
    the code may import), while an ignored file (data, a store) leaves it clean."""
    import subprocess

    import cac.exp.provenance as provenance

    repo = tmp_path / "checkout"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    (repo / ".gitignore").write_text("/data/\n*.db\n")
    (repo / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    (repo / "a.py").write_text("x = 2\n")
    git("commit", "-q", "-am", "two")
    monkeypatch.setattr(provenance, "_ROOT", repo)

    def read() -> dict:
        provenance._source_tree.cache_clear()
        return provenance.source_tree()

    try:
        tags = read()
        assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD") != git("rev-parse", "HEAD~1")
        assert tags["mlflow.source.git.branch"] == "main" and tags["mlflow.source.git.dirty"] == "false"
        (repo / "data").mkdir()
        (repo / "data" / "x.png").write_bytes(b"x")
        (repo / "mlflow.db").write_bytes(b"x")
        assert read()["mlflow.source.git.dirty"] == "false"  # ignored: data and stores
        (repo / "b.py").write_text("import a\n")
        assert read()["mlflow.source.git.dirty"] == "true"  # an untracked module
        (repo / "b.py").unlink()
        (repo / "a.py").write_text("x = 3\n")
        assert read()["mlflow.source.git.dirty"] == "true"  # a changed tracked file
    finally:
        provenance._source_tree.cache_clear()
