"""A user's model config that already has CAC, and run identity with data roots set per dataloader.

1. A config whose final decode head is a ``CACHead`` (README's one-line form, or ``cac-exp config``'s
   output given back with ``--model``): a plain row trains the head it wraps (never a silent CAC
   baseline), a +CAC row re-wraps that head with the row's options alone, and ``existing_cac`` tells
   what the config's own options were. A CACHead anywhere else (an earlier cascade stage, inside
   another CACHead) is one CacError line.
2. ``config_hash`` relativises every ``data_root`` of the config (each dataloader's, wrapped datasets'),
   not only the top-level one: the same unit under another ``CAC_DATA_ROOT`` is the same run, another
   data layout is another run.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cac.errors import CacError
from cac.mmseg.config import config_hash, dump_config, existing_cac, resolve_config

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "experiments" / "table1_ade20k.yaml"


def _cac_heads(node, path="model") -> list[str]:
    """Paths of every CACHead in a config tree (independent of the code under test)."""
    found = [path] if isinstance(node, dict) and node.get("type") == "CACHead" else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _cac_heads(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _cac_heads(value, f"{path}.{i}")
    return found


def _cac_config_file(tmp_path: Path, model: str = "fcn-slim-r18", tau: float = 10.0) -> Path:
    """What `cac-exp config` writes for a +CAC row (tau 10), as a user would give it back with --model."""
    cfg = resolve_config(model, "quick", cac={"tau": tau})
    path = tmp_path / f"{model}-cac.py"
    dump_config(cfg, path)
    return path


# -- 1. a config that already has CAC ---------------------------------------------------------------

def test_plain_row_of_a_cac_config_trains_the_wrapped_head(tmp_path):
    from cac.mmseg.params import build_model

    path = _cac_config_file(tmp_path)
    assert existing_cac(str(path)) == {"tau": 10.0}
    cfg = resolve_config(str(path), "quick", cac=None)
    head = cfg["model"]["decode_head"]
    assert head["type"] == "FCNHead" and "cac" not in head and "head" not in head
    assert _cac_heads(cfg["model"]) == []
    assert cfg["custom_imports"]["imports"].count("cac") == 1
    assert resolve_config(str(path), "quick", cac=False)["model"] == cfg["model"]
    model = build_model(cfg["model"])
    assert type(model.decode_head).__name__ == "FCNHead"
    assert not any(type(m).__name__ == "CACHead" for m in model.modules())


def test_cac_row_of_a_cac_config_uses_the_rows_options_only(tmp_path):
    from cac.mmseg.params import build_model

    path = _cac_config_file(tmp_path)
    cfg = resolve_config(str(path), "quick", cac={"tau": 3.0, "lambda_kl": 0.5})
    assert _cac_heads(cfg["model"]) == ["model.decode_head"]
    head = cfg["model"]["decode_head"]
    assert head["cac"] == {"tau": 3.0, "lambda_kl": 0.5}  # replaced, not merged with the file's tau 10
    assert head["head"]["type"] == "FCNHead"
    assert _cac_heads(head["head"]) == []
    # +CAC with the paper's defaults: none of the file's options are left
    assert resolve_config(str(path), "quick", cac=True)["model"]["decode_head"]["cac"] == {}
    # the file given back with the row it came from resolves to the same model
    assert resolve_config(str(path), "quick", cac={"tau": 10.0})["model"] == \
        resolve_config("fcn-slim-r18", "quick", cac={"tau": 10.0})["model"]
    model = build_model(cfg["model"])
    assert type(model.decode_head).__name__ == "CACHead"
    assert type(model.decode_head.head).__name__ == "FCNHead"
    assert model.decode_head.options.tau == 3.0


def test_a_config_file_is_parsed_once_until_it_or_a_base_beside_it_changes(tmp_path, monkeypatch):
    """Reports plan dozens of units from one config file: mmengine parses it once; an edit to the file
    or to its ``_base_`` beside it is read, and every caller gets its own copy."""
    import os

    from mmengine.config import Config

    from cac.mmseg import zoo

    dump_config(resolve_config("fcn-slim-r18", "quick"), tmp_path / "plain.py")
    path = tmp_path / "mine.py"
    path.write_text("_base_ = ['./plain.py']\nmodel = dict(decode_head=dict(num_classes=7))\n")
    parsed = []
    real = Config.fromfile
    monkeypatch.setattr(Config, "fromfile", staticmethod(lambda *a, **k: parsed.append(a[0]) or real(*a, **k)))
    first, second = zoo._load_config_file(str(path)), zoo._load_config_file(str(path))
    assert len(parsed) == 1 and first.to_dict() == second.to_dict() and first is not second
    first.model.decode_head.num_classes = 99  # a caller's edit stays its own
    assert zoo._load_config_file(str(path)).model.decode_head.num_classes == 7 and len(parsed) == 1

    def edit(file: Path, old: str, new: str) -> None:
        stat = file.stat()
        file.write_text(file.read_text().replace(old, new))
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later mtime, even on coarse clocks
    edit(path, "num_classes=7", "num_classes=5")
    assert zoo._load_config_file(str(path)).model.decode_head.num_classes == 5 and len(parsed) == 2
    edit(tmp_path / "plain.py", "align_corners=False", "align_corners=True")
    assert zoo._load_config_file(str(path)).model.decode_head.align_corners is True and len(parsed) == 3


def test_readme_one_line_form_over_a_base(tmp_path):
    """``decode_head=dict(type='CACHead', head_type=..., cac=...)`` merged over a base's head."""
    from cac.mmseg.params import build_model

    dump_config(resolve_config("fcn-slim-r18", "quick"), tmp_path / "plain.py")
    path = tmp_path / "mine.py"
    path.write_text("_base_ = ['./plain.py']\ncustom_imports = dict(imports='cac')\n"
                    "model = dict(decode_head=dict(type='CACHead', head_type='FCNHead', cac=dict(tau=15)))\n")
    assert existing_cac(str(path)) == {"tau": 15}
    plain = resolve_config(str(path), "quick")
    assert plain["model"] == resolve_config("fcn-slim-r18", "quick")["model"]
    assert plain["custom_imports"]["imports"] == ["cac"]  # a one-module string, not its letters
    with_cac = resolve_config(str(path), "quick", cac={"tau": 2.0})
    assert with_cac["model"]["decode_head"]["cac"] == {"tau": 2.0}
    assert with_cac["model"] == resolve_config("fcn-slim-r18", "quick", cac={"tau": 2.0})["model"]
    build_model(plain["model"])


def test_cascade_config_with_cac(tmp_path):
    """OCRNet: CAC on the last stage; plain rows unwrap it, +CAC rows re-wrap the last stage only."""
    from cac.mmseg.params import build_model

    path = _cac_config_file(tmp_path, "ocrnet-hr18")
    assert existing_cac(str(path)) == {"tau": 10.0}
    plain = resolve_config(str(path), "quick")
    assert [h["type"] for h in plain["model"]["decode_head"]] == ["FCNHead", "OCRHead"]
    assert _cac_heads(plain["model"]) == []
    with_cac = resolve_config(str(path), "quick", cac={"tau": 4.0})
    assert _cac_heads(with_cac["model"]) == ["model.decode_head.1"]
    assert with_cac["model"]["decode_head"][1]["cac"] == {"tau": 4.0}
    assert with_cac["model"]["decode_head"][1]["head"]["type"] == "OCRHead"
    assert with_cac["model"]["decode_head"][0] == plain["model"]["decode_head"][0]
    model = build_model(with_cac["model"])
    assert [type(h).__name__ for h in model.decode_head] == ["FCNHead", "CACHead"]



def test_cac_heads_own_init_cfg_stays_with_cac(tmp_path):
    """The CACHead's own arguments (init_cfg) belong to the wrapper: kept by +CAC rows, not given to the
    plain head."""
    cfg = resolve_config("fcn-slim-r18", "quick", cac={"tau": 10.0})
    init = dict(type="Normal", std=0.01, layer="Conv2d")
    cfg["model"]["decode_head"]["init_cfg"] = init
    path = tmp_path / "init.py"
    dump_config(cfg, path)
    assert "init_cfg" not in resolve_config(str(path), "quick")["model"]["decode_head"]
    head = resolve_config(str(path), "quick", cac={"tau": 2.0})["model"]["decode_head"]
    assert head["init_cfg"] == init and head["cac"] == {"tau": 2.0} and "init_cfg" not in head["head"]

@pytest.mark.parametrize("where, edit, needle", [
    ("earlier stage", lambda heads: [dict(type="CACHead", head=heads[0], cac={}), heads[1]],
     "model.decode_head.0: a CACHead at stage 0 of the 2-stage cascade"),
    ("inside CACHead", lambda heads: [heads[0], dict(type="CACHead", cac={}, head=dict(
        type="CACHead", head=heads[1], cac={}))], "model.decode_head.1.head: a CACHead inside the CACHead"),
])
@pytest.mark.parametrize("cac", [None, {"tau": 1.0}])
def test_misplaced_cac_head_is_one_line(tmp_path, where, edit, needle, cac):
    cfg = resolve_config("ocrnet-hr18", "quick")
    cfg["model"]["decode_head"] = edit(cfg["model"]["decode_head"])
    path = tmp_path / "misplaced.py"
    dump_config(cfg, path)
    with pytest.raises(CacError) as err:
        resolve_config(str(path), "quick", cac=cac)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and needle in message and str(path) in message, message
    with pytest.raises(CacError, match="a CACHead"):
        existing_cac(str(path))


def test_plain_row_cannot_become_cac_by_override():
    with pytest.raises(CacError, match="the row is plain"):
        resolve_config("fcn-slim-r18", "quick", overrides={"model.decode_head": dict(
            type="CACHead", head_type="FCNHead", cac={})})


def test_existing_cac_of_models_without_cac():
    assert existing_cac("fcn-slim-r18") is None
    assert existing_cac(resolve_config("fcn-slim-r18", "quick")) is None
    assert existing_cac(resolve_config("fcn-slim-r18", "quick", cac=True)) == {}


# -- 2. run identity with per-dataloader data roots -------------------------------------------------

def _unit(monkeypatch, data_root: Path, *, model=None, row="fcn-mv2+cac"):
    from cac.exp.options import RunOptions
    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec

    monkeypatch.setenv("CAC_DATA_ROOT", str(data_root))
    spec = load_spec(TABLE1)
    return make_unit(spec, spec.row(row), 0, "paper", options=RunOptions(model=model))


def test_paper_row_under_other_data_roots_is_the_same_run(tmp_path, monkeypatch):
    here = _unit(monkeypatch, tmp_path / "node-a" / "data")
    there = _unit(monkeypatch, tmp_path / "mnt" / "shared" / "datasets")
    assert here.cfg["train_dataloader"]["dataset"]["data_root"] != there.cfg["train_dataloader"]["dataset"]["data_root"]
    assert here.cfg_hash == there.cfg_hash


def _own_data_config(tmp_path: Path, roots: dict, name: str = "mine.py") -> Path:
    """A user's config (the slim FCN) whose dataloaders each have their own data_root, with wrappers
    (RepeatDataset, ConcatDataset) and no top-level data_root."""
    cfg = resolve_config("fcn-slim-r18", "quick")
    for key in ("data_root", "work_dir", "randomness", "default_scope"):
        cfg.pop(key, None)

    def ds(root: str) -> dict:
        return dict(type="ContextScenesDataset", data_root=root, pipeline=cfg["test_pipeline"],
                    data_prefix=dict(img_path="images/val", seg_map_path="annotations/val"))

    cfg["train_dataloader"]["dataset"] = dict(type="RepeatDataset", times=2, dataset=ds(roots["train"]))
    cfg["val_dataloader"]["dataset"] = dict(type="ConcatDataset", datasets=[ds(roots["val_a"]), ds(roots["val_b"])])
    cfg["test_dataloader"]["dataset"] = ds(roots["test"])
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, path)
    return path


LAYOUT = {"train": "scenes/train-set", "val_a": "scenes/val-a", "val_b": "extra/val-b", "test": "scenes/val-a"}


def test_own_config_with_relative_roots_per_dataloader(tmp_path, monkeypatch):
    """Relative roots in the file are under CAC_DATA_ROOT: another CAC_DATA_ROOT, the same run."""
    path = _own_data_config(tmp_path, {k: f"data/{v}" for k, v in LAYOUT.items()})
    here = _unit(monkeypatch, tmp_path / "node-a" / "data", model=str(path))
    there = _unit(monkeypatch, tmp_path / "mnt" / "shared" / "datasets", model=str(path))
    val = [d["data_root"] for d in here.cfg["val_dataloader"]["dataset"]["datasets"]]
    assert val == [str(tmp_path / "node-a" / "data" / "scenes" / "val-a"),
                   str(tmp_path / "node-a" / "data" / "extra" / "val-b")]
    assert "data_root" not in here.cfg
    assert here.cfg_hash == there.cfg_hash
    # another layout (the second val set beside the first, not under extra/) is another run
    moved = _own_data_config(tmp_path, {k: f"data/{v}" for k, v in {**LAYOUT, "val_b": "scenes/val-b"}.items()},
                             "moved.py")
    assert _unit(monkeypatch, tmp_path / "mnt" / "shared" / "datasets", model=str(moved)).cfg_hash != there.cfg_hash


def test_own_config_with_absolute_roots_per_dataloader(tmp_path, monkeypatch):
    """The same file on two machines (absolute roots under each one's data folder) is the same run;
    roots that point at other places relative to one another are not."""
    def on(machine: str, layout: dict) -> str:
        prefix = tmp_path / machine
        path = _own_data_config(prefix, {k: str(prefix / "datasets" / v) for k, v in layout.items()})
        return config_hash(resolve_config(str(path), "paper", cac=True))

    assert on("node-a", LAYOUT) == on("mnt/shared", LAYOUT)
    assert on("node-a", {**LAYOUT, "test": "scenes/val-b"}) != on("node-a", LAYOUT)
    assert on("node-a", {**LAYOUT, "train": "scenes/val-a", "val_a": "scenes/train-set"}) != on("node-a", LAYOUT)


def test_single_root_configs_hash_as_before():
    """Every preset's config has one data root; its hash is the top-level root's alone, as before
    (tracked runs keep their identity)."""
    import hashlib
    import json

    from cac.mmseg.cfgtree import to_plain

    def top_level_only(cfg) -> str:  # the hash before per-dataloader roots
        plain = to_plain(cfg)
        root = plain["data_root"].rstrip("/")

        def rel(node):
            if isinstance(node, dict):
                return {k: rel(v) for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                return [rel(v) for v in node]
            if isinstance(node, str) and (node == root or node.startswith(root + "/")):
                return "<data_root>" + node[len(root):]
            return node

        payload = rel({k: v for k, v in plain.items() if k not in ("work_dir", "launcher", "resume", "load_from")})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    for cfg in (resolve_config("fcn-slim-r18", "quick", cac=True), resolve_config("ocrnet-hr18", "paper"),
                resolve_config("fcn-mv2", "paper", cac=True, dataset="cityscapes")):
        assert config_hash(cfg) == top_level_only(cfg)


def test_the_plan_and_the_run_say_the_configs_own_cac_was_replaced(tmp_path, capsys):
    """`cac-exp run --dry-run --model <a CAC config>` names the config's own CAC settings and what the
    rows do instead; each unit carries them as the `config_cac` tag (MLflow's record of the run)."""
    from cac.cli import main
    from cac.exp.options import RunOptions
    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec

    path = _cac_config_file(tmp_path)
    table2 = ROOT / "ablations" / "table2.yaml"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(table2), "--preset", "quick", "--rows", "(a),(f)", "--model", str(path),
                 "--tracking-uri", uri, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "the config already has CAC ({\"tau\": 10.0}); its own CAC settings are replaced by the row's" in out
    assert "the config already has CAC ({\"tau\": 10.0}); the row trains the head its CACHead wraps" in out
    spec = load_spec(str(table2))
    unit = make_unit(spec, spec.row("(f)"), 0, "quick", options=RunOptions(model=str(path.resolve())))
    assert unit.tags["config_cac"] == '{"tau": 10.0}'
    plain = make_unit(spec, spec.row("(a)"), 0, "quick", options=RunOptions(model=str(path.resolve())))
    assert plain.tags["config_cac"] == '{"tau": 10.0}' and plain.row.cac is None


def test_the_runners_config_is_the_same_config_unformatted_and_the_artifact_formatted():
    """mmengine prints the Runner's config into its log, checkpoints and work dir: that text skips
    yapf (seconds per copy for a large config), and reads back as the same config as the formatted
    config.py artifact; a Runner's deep copy keeps it unformatted; the dict given is not touched."""
    import copy

    import mmengine.config.config as mmengine_config
    from mmengine.config import Config

    from cac.mmseg.config import dump_config, resolve_config, runner_config

    cfg = resolve_config("fcn-slim-r18", "quick", cac=True)
    ours = runner_config(cfg)
    formatted = dump_config(cfg)
    yapf = mmengine_config.FormatCode

    def no_yapf(*args, **kwargs):
        raise AssertionError("yapf ran")

    mmengine_config.FormatCode = no_yapf
    try:
        text, copied = ours.pretty_text, copy.deepcopy(ours).pretty_text
        with pytest.raises(SyntaxError):  # mmengine's wrapping of what yapf raised
            dump_config(cfg)
    finally:
        mmengine_config.FormatCode = yapf
    assert text != formatted and copied == text
    assert Config.fromstring(text, ".py").to_dict() == Config.fromstring(formatted, ".py").to_dict()
    ours.train_cfg.max_iters = -1
    assert cfg["train_cfg"]["max_iters"] == 100
