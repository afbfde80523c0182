"""Credentials and the tracking journal, without a server: public URLs, scrubbed lines, a clone's token,
a store's identity across a password change, a job's pickle, and the journal's exactly-once delivery
to real MLflow stores (the outages themselves: tests/test_outage.py, tests/test_postgres.py)."""
import json
import pickle
import subprocess
from pathlib import Path

import mlflow
import pytest

from cac.exp.credentials import public_url, remember, scrub, with_credentials
from cac.exp.journal import Journal, deliver_journal, metric_record

SECRET = "s3cr3t-P4ss"


@pytest.mark.parametrize("url,public", [
    (f"postgresql://postgres:{SECRET}@127.0.0.1:5432/optuna", "postgresql://127.0.0.1:5432/optuna"),
    (f"postgresql+psycopg://lab:{SECRET}@db.lab:5432/mlflow?sslmode=require", "postgresql+psycopg://db.lab:5432/mlflow?sslmode=require"),
    (f"postgresql://lab@/mlflow?host=/var/run/postgresql&password={SECRET}", "postgresql:///mlflow?host=/var/run/postgresql"),
    (f"http://ci:{SECRET}@mlflow.lab:5000/", "http://mlflow.lab:5000/"),
    (f"https://{SECRET}@github.com/lab/cac.git", "https://github.com/lab/cac.git"),  # a bare token as the user
    (f"https://mlflow.lab/api?token={SECRET}&x=1", "https://mlflow.lab/api?x=1"),
    (f"mysql://root:{SECRET}@127.0.0.1/mlflow", "mysql://127.0.0.1/mlflow"),
    ("git@github.com:lab/cac.git", "git@github.com:lab/cac.git"),  # scp-like: a user name, no secret
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("journal:///tmp/optuna.log", "journal:///tmp/optuna.log"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
    ("/a/plain/path", "/a/plain/path"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_public_url_drops_every_credential_and_keeps_the_rest(url, public):
    assert public_url(url) == public
    assert SECRET not in public_url(url)


def test_scrub_removes_secrets_quoted_outside_urls(monkeypatch):
    """A driver's message may quote a password without its URL; secret environment values too."""
    remember(f"postgresql://u:{SECRET}@h/db")
    monkeypatch.setenv("LAB_API_TOKEN", "tok-9d8c7b6a")
    line = f"failed for postgresql://u:{SECRET}@h/db: password {SECRET} refused; token tok-9d8c7b6a; user u"
    assert scrub(line) == "failed for postgresql://h/db: password *** refused; token ***; user u"


def test_a_libraries_flag_is_not_a_secret_and_real_secret_names_are(monkeypatch):
    """Importing mmseg sets TOKENIZERS_PARALLELISM=false; it must not make every "false" in a record
    "***" (it did: every run's git_dirty tag). Secret names are matched by their words."""
    import mmseg.utils  # noqa: F401  (its tokenizer module sets the variable, as in every training process)
    import os

    from cac.exp.credentials import secret_env_name

    assert os.environ.get("TOKENIZERS_PARALLELISM") == "false"
    assert scrub("git_dirty false; {\"flip\": false}") == "git_dirty false; {\"flip\": false}"
    named = ["MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "LAB_API_KEY",
             "HF_TOKEN", "GITHUB_APITOKEN", "DB_PWD", "GOOGLE_APPLICATION_CREDENTIALS"]
    assert all(secret_env_name(n) for n in named)
    assert not any(secret_env_name(n) for n in ["TOKENIZERS_PARALLELISM", "KEYBOARD_LAYOUT", "MONKEY", "PASSAGE_DIR"])
    monkeypatch.setenv("LAB_SECRET_FLAG", "false")  # a flag's value is never taken for a secret
    monkeypatch.setenv("PGPASSWORD", "pg-77aa31")
    assert scrub("dirty false, password pg-77aa31") == "dirty false, password ***"


def test_a_job_finds_its_full_url_in_the_environment_it_inherits(monkeypatch):
    """The submitting process puts the full URLs in the environment and a job's pickle holds only
    the public ones; the job takes the full URL back from what it inherited."""
    from cac.exp.dispatch import STORAGE_ENV, UnitJob, hand_over, take_over
    from cac.exp.options import RunOptions

    uri, storage = f"postgresql://lab:{SECRET}@127.0.0.1:5432/mlflow", f"postgresql://lab:{SECRET}@127.0.0.1:5432/optuna"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    public, public_storage = hand_over(uri, storage)
    job = UnitJob("spec.yaml", "(f)", 0, "quick", RunOptions(), public, "/work", {"CAC_LOG_LEVEL": "ERROR"})
    assert SECRET.encode() not in pickle.dumps(job) and public == "postgresql://127.0.0.1:5432/mlflow"
    assert take_over(job.uri) == uri and take_over(public_storage, STORAGE_ENV) == storage
    assert with_credentials(public, ["postgresql://lab:x@other:5432/mlflow"]) == public  # another store: as given


def test_a_clones_token_never_reaches_the_source_tags(tmp_path, monkeypatch):
    """A checkout cloned with a token keeps it in its remote; the run's repoURL tag does not."""
    import cac.exp.provenance as provenance

    repo = tmp_path / "checkout"
    repo.mkdir()
    for cmd in (["init", "-q"], ["remote", "add", "origin", f"https://ci:{SECRET}@git.lab/cac.git"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    monkeypatch.setattr(provenance, "_ROOT", repo)
    provenance._source_tree.cache_clear()
    try:
        tags = provenance.run_tags()
    finally:
        provenance._source_tree.cache_clear()
    assert tags["mlflow.source.git.repoURL"] == "https://git.lab/cac.git"
    assert SECRET not in json.dumps(tags)


def test_a_store_keeps_its_work_dirs_when_its_password_changes(tmp_path):
    """The owner of a work dir is a store's public URL: after a password rotation the unit's own
    checkpoints are resumed, not moved aside. An owner file written before (the URL with its password)
    is read the same way; another store's checkpoints are still moved aside."""
    from cac.exp.workdirs import OWNER_FILE, claim_work_dir

    work = tmp_path / "unit"
    work.mkdir()
    (work / "iter_4.pth").write_bytes(b"x")
    (work / OWNER_FILE).write_text(json.dumps({"tracking_uri": f"postgresql://lab:{SECRET}@db:5432/mlflow",
                                               "run_id": "r1"}))
    said = []
    claim_work_dir(work, "postgresql://lab:rotated-Pass@db:5432/mlflow", "r1", said.append)
    assert (work / "iter_4.pth").exists() and not said
    assert SECRET not in (work / OWNER_FILE).read_text() and "rotated" not in (work / OWNER_FILE).read_text()
    claim_work_dir(work, "postgresql://lab:x@elsewhere:5432/mlflow", "r1", said.append)
    assert not (work / "iter_4.pth").exists() and said and SECRET not in said[0]


def _run(uri: str) -> str:
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client.create_run(client.create_experiment("journal")).info.run_id


def test_journal_keeps_what_waits_across_processes_and_torn_records(tmp_path):
    """Records are on disk once appended; an acknowledged count survives; a record torn by a kill is
    dropped; the steps and latest values cover delivered and waiting records alike."""
    journal = Journal(tmp_path, "run1", f"postgresql://u:{SECRET}@db/mlflow")
    journal.append(metric_record({"train/loss": 2.0, "val/mIoU": float("nan")}, 10))
    journal.append(metric_record({"train/loss": 1.5}, 20), {"op": "status", "status": "FINISHED", "t": 1})
    journal.acknowledge(1)
    with open(journal.path, "a") as fh:
        fh.write('{"op": "metrics", "step": 30, "t": 5, "val')  # a kill in the middle of a write
    again = Journal(tmp_path, "run1", "postgresql://u:other@db/mlflow")
    assert again.pending() == 2 and again.suspect and again.status == "FINISHED"
    assert again.logged_steps() == {"train/loss": 20} and again.latest_metrics() == {"train/loss": 1.5}
    assert again.store == "postgresql://db/mlflow" and SECRET not in journal.path.read_text()
    assert journal.path.read_text().endswith("\n")  # the torn record is gone: appends stay parseable
    again.append(metric_record({"train/loss": 1.0}, 30))
    assert Journal(tmp_path, "run1", "").pending() == 3


@pytest.mark.parametrize("scheme", ["file", "sqlite"])
def test_a_batch_delivered_before_a_kill_is_not_delivered_again(tmp_path, scheme, monkeypatch):
    """A process that sent a batch but died before recording it leaves a suspect journal: the next
    delivery checks the store's history and sends only what is missing. MLflow's file store keeps
    duplicates, so this is what keeps each step once there; its SQL stores drop exact duplicates."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this
    uri = f"file://{tmp_path}/mlruns" if scheme == "file" else f"sqlite:///{tmp_path}/mlflow.db"
    run_id = _run(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    journal = Journal(tmp_path / "tracking", run_id, uri)
    journal.append(metric_record({"train/loss": 2.0, "train/lr": 0.01}, 10))
    head = journal.head()
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, head[0]["t"], 10)  # sent, never acknowledged
                                      for k, v in head[0]["values"].items()])
    journal.append(metric_record({"train/loss": 1.0, "train/lr": 0.01}, 20))
    reopened = Journal(tmp_path / "tracking", run_id, uri)  # the next process
    assert reopened.suspect
    while reopened.pending():
        deliver_journal(reopened, client, print)
    for key in ("train/loss", "train/lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [10, 20], key


def test_params_keep_their_first_value_and_a_refused_record_is_said_and_skipped(tmp_path):
    """A param the run has already keeps its first value (MLflow's params are immutable: the key is not
    sent again); a record the store refuses whatever the retries (the run was deleted meanwhile) is
    said and skipped, so the journal never blocks on it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = _run(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.log_param(run_id, "setting.seed", "0")
    journal = Journal(tmp_path / "tracking", run_id, uri)
    journal.append({"op": "params", "values": {"setting.seed": "1", "setting.preset": "quick"}})
    said = []
    deliver_journal(journal, client, said.append)
    assert client.get_run(run_id).data.params == {"setting.seed": "0", "setting.preset": "quick"} and not said
    client.delete_run(run_id)
    journal.append(metric_record({"train/loss": 1.0}, 10), {"op": "status", "status": "FINISHED", "t": 1})
    while journal.pending():
        deliver_journal(journal, client, said.append)
    assert len(said) == 2 and all("the store refused" in line and run_id in line for line in said), said
