"""Experiment specs: a YAML file of rows (the paper's labels) over one base model, strictly validated.

Schema (unknown keys are refused everywhere)::

    title: "Table 3: designs for the KL loss"     # required
    task: train | benchmark                        # benchmark: Table 6 timing/memory, no training
    benchmark: {sizes: [512], warmup: 3, repeats: 10, batch_size: 1, device: auto}
    model: upernet-swin-t | {paper: upernet-swin-t, bench: fcn-slim-r18, quick: fcn-slim-r18}
                                                   # or an mmseg config file (relative to this file)
                                                   # or mmseg::<config>; `--model` replaces it for all rows
    dataset: ade20k | cocostuff | cityscapes | pascal-context   # the paper preset's data (default ade20k)
    baseline: "(a)"                                # the row Δ is measured against
    compare: "CAC"                                 # optional: a second Δ column, against this row
    seeds: 3 | [0, 1, 2]                           # default 3 -> [0, 1, 2]
    cac: {tau: 15, lambda_kl: 1, ...}              # CAC options shared by all +CAC rows
    overrides: {"model.decode_head.channels": 64}  # dotted config keys, all rows
    presets: {quick: {seeds: 1, overrides: {...}, classifier: {gmmseg: {mem_size: 500}}}}
                                                   # per-preset adjustments (classifier: options of that
                                                   # kind's rows at the preset; a row's own options win)
    rows:
      - label: "(a)"
        description: "w/o KL"
        cac: false | true | {lambda_kl: 0}         # false: the plain model; a dict merges over `cac`
        classifier: {type: gmmseg, ...}            # another pixel classifier (cac.core.classifiers), not CAC
        presets: [paper]                           # optional: the presets the row exists at (default: all)
        model: ...                                 # optional, as above
        overrides: {...}
        paper: 45.74 | {ss: .., ms: .., fps: .., params: ..}
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from cac.core.classifier import CACOptions
from cac.errors import CacError
from cac.mmseg.presets import PRESETS

__all__ = ["REPO", "spec_files", "find_spec", "slug", "Spec", "Row", "SpecError", "load_spec"]


class SpecError(CacError):
    """A spec that cannot run; the message names the file and the key."""


_TOP = {"title", "description", "task", "model", "dataset", "baseline", "compare", "seeds", "cac", "overrides",
        "presets", "benchmark", "rows"}
_ROW = {"label", "description", "cac", "classifier", "model", "overrides", "paper", "presets"}
_PRESET = {"seeds", "overrides", "model", "benchmark", "classifier"}
_TASKS = ("train", "benchmark")
_BENCH = {"sizes": (list, "a non-empty list of positive image sizes"), "warmup": (int, "an integer >= 0"),
          "repeats": (int, "an integer >= 1"), "batch_size": (int, "an integer >= 1"),
          "device": (str, "auto, cpu or cuda")}
_PAPER = {"ss", "ms", "fps", "params", "mem", "fps_delta", "mem_delta", "ss_cocostuff", "ms_cocostuff"}
_DATASETS = ("ade20k", "cocostuff", "cityscapes", "pascal-context")


@dataclass(frozen=True)
class Row:
    label: str
    description: str
    cac: Optional[dict]  # None: plain model (or another classifier); dict: CACOptions fields (validated)
    model: Any
    overrides: dict
    paper: Any
    classifier: Optional[dict] = None  # another pixel classifier: {type: gmmseg|protoseg, **options}
    presets: Optional[tuple] = None  # the presets the row exists at (None: all)

    @property
    def kind(self) -> str:
        """The row's pixel classifier: ``linear`` (the head's own), ``cac`` or another type."""
        if self.classifier is not None:
            return str(self.classifier["type"]).lower()
        return "linear" if self.cac is None else "cac"

    def model_for(self, preset: str) -> str:
        return self.model[preset] if isinstance(self.model, Mapping) else self.model


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    title: str
    description: str
    dataset: str
    baseline: Optional[str]
    seeds: list[int]
    overrides: dict
    presets: dict
    rows: list[Row] = field(default_factory=list)
    task: str = "train"  # "benchmark": timing and memory (Table 6) instead of training
    benchmark: dict = field(default_factory=dict)
    compare: Optional[str] = None  # a second reference row: the report adds a Δ against it

    def benchmark_for(self, preset: str) -> dict:
        return {**self.benchmark, **self.presets.get(preset, {}).get("benchmark", {})}

    def rows_for(self, preset: str) -> list[Row]:
        """The rows that exist at ``preset`` (a row may be limited to some, e.g. a paper-scale model)."""
        return [r for r in self.rows if r.presets is None or preset in r.presets]

    def classifier_for(self, row: Row, preset: str) -> Optional[dict]:
        """The row's other classifier at ``preset``: the preset's options for its kind, then the row's own."""
        if row.classifier is None:
            return None
        adjust = self.presets.get(preset, {}).get("classifier", {}).get(row.kind, {})
        return {**adjust, **row.classifier}

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise SpecError(f"{self.path}: no row {label!r}; rows are {', '.join(r.label for r in self.rows)}")

    def seeds_for(self, preset: str, n: Optional[int] = None) -> list[int]:
        seeds = self.presets.get(preset, {}).get("seeds", self.seeds)
        seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        return seeds if n is None else list(range(n))

    def overrides_for(self, row: Row, preset: str) -> dict:
        return {**self.overrides, **self.presets.get(preset, {}).get("overrides", {}), **row.overrides}

    def with_model(self, model: Optional[str]) -> "Spec":
        """This spec with ``model`` (``--model``: a name or an absolute config path) as every row's base
        model, at every preset; the spec itself when ``model`` is None."""
        if not model:
            return self
        import dataclasses

        from cac.mmseg.zoo import resolve_model

        presets = {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in self.presets.items()}
        rows = [dataclasses.replace(r, model=model) for r in self.rows]
        # Report titles name the model the rows were trained on.
        title = f"{self.title} — on {resolve_model(model).name}"
        return dataclasses.replace(self, presets=presets, rows=rows, title=title)

    def model_for(self, row: Row, preset: str) -> str:
        model = self.presets.get(preset, {}).get("model") or row.model_for(preset)
        if model is None:
            raise SpecError(f"{self.path}: row {row.label} has no model for preset {preset!r}")
        return model


def _fail(path: Path, where: str, msg: str) -> None:
    raise SpecError(f"{path}: {where}: {msg}" if where else f"{path}: {msg}")


def _check_keys(path: Path, where: str, obj: Any, allowed: set[str]) -> None:
    if not isinstance(obj, Mapping):
        _fail(path, where, f"must be a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        _fail(path, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _check_type(path: Path, where: str, value: Any, types: tuple, what: str) -> None:
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        _fail(path, where, f"must be {what}, got {type(value).__name__} {value!r}")


def _check_model(path: Path, where: str, model: Any) -> Any:
    """A model reference (or one per preset), with config file paths made absolute (they are relative
    to the spec file); an unknown name or an unusable config file fails here, naming the key."""
    from cac.mmseg.zoo import MMSEG_PREFIX, MODELS, is_model_file, resolve_model

    def one(where: str, name: Any) -> str:
        _check_type(path, where, name, (str,), "a model name or an mmseg config file")
        if not is_model_file(name):
            if name not in MODELS:
                _fail(path, where, f"unknown model {name!r} (known: {', '.join(sorted(MODELS))}; "
                                   "or give an mmseg config file, or mmseg::<config>)")
            return name
        ref = name if name.startswith(MMSEG_PREFIX) else str((path.parent / Path(name).expanduser()).resolve())
        try:
            resolve_model(ref)
        except CacError as err:
            _fail(path, where, str(err))
        return ref

    if isinstance(model, Mapping):
        _check_keys(path, where, model, set(PRESETS))
        return {k: one(f"{where}.{k}", v) for k, v in model.items()}
    return one(where, model)


def _check_cac(path: Path, where: str, value: Any) -> Optional[dict]:
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        _fail(path, where, f"must be true, false or a mapping of CAC options, got {value!r}")
    known = set(CACOptions.__dataclass_fields__)
    _check_keys(path, where, value, known)
    for key, val in value.items():
        default = CACOptions.__dataclass_fields__[key].default
        types = (int, float) if isinstance(default, float) else (type(default),)
        _check_type(path, f"{where}.{key}", val, types, f"a {type(default).__name__}")
    try:
        CACOptions.from_dict(value)
    except ValueError as err:
        _fail(path, where, str(err).replace("cac.", ""))
    return dict(value)


def _other_classifiers() -> set[str]:
    from cac.core.classifiers import CLASSIFIERS

    return set(CLASSIFIERS) - {"cac"}


def _check_classifier(path: Path, where: str, value: Any) -> dict:
    """A row's ``classifier``: a mapping with a registered ``type`` and that kind's options."""
    from cac.core.classifiers import CLASSIFIERS, split_classifier

    if not isinstance(value, Mapping) or "type" not in value:
        _fail(path, where, f"must be a mapping with a `type` ({', '.join(sorted(CLASSIFIERS))}) and its options, "
                           f"got {value!r}")
    if str(value["type"]).lower() == "cac":
        _fail(path, where, "CAC is the row's `cac:` key; `classifier:` names another classifier")
    try:
        split_classifier(value)
    except ValueError as err:
        _fail(path, where, str(err))
    return {**dict(value), "type": str(value["type"]).lower()}


def _check_overrides(path: Path, where: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        _fail(path, where, "must be a mapping of dotted config keys to values")
    return dict(value)


def _check_seeds(path: Path, where: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        _fail(path, where, f"must be a count or a list of integers, got {value!r}")
    if isinstance(value, int) and value < 1:
        _fail(path, where, f"must be >= 1, got {value}")
    if isinstance(value, list):
        if not value or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
            _fail(path, where, f"must be a non-empty list of non-negative integers, got {value!r}")
        if len(set(value)) != len(value):
            _fail(path, where, f"has duplicate seeds {value!r}")
    return value


def _check_benchmark(path: Path, where: str, value: Any) -> dict:
    if value is None:
        return {}
    _check_keys(path, where, value, set(_BENCH))
    for key, val in value.items():
        typ, what = _BENCH[key]
        _check_type(path, f"{where}.{key}", val, (typ,), what)
        ok = {"sizes": lambda v: bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v),
              "warmup": lambda v: v >= 0, "repeats": lambda v: v >= 1, "batch_size": lambda v: v >= 1,
              "device": lambda v: v in ("auto", "cpu", "cuda")}[key](val)
        if not ok:
            _fail(path, f"{where}.{key}", f"must be {what}, got {val!r}")
    return dict(value)


def _check_paper(path: Path, where: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        _check_keys(path, where, value, _PAPER)
        for key, val in value.items():
            _check_type(path, f"{where}.{key}", val, (int, float), "a number")
        return dict(value)
    _check_type(path, where, value, (int, float), "a number or a mapping of numbers")
    return value


def parse_spec(data: Any, path: Path) -> Spec:
    _check_keys(path, "", data, _TOP)
    for key in ("title", "rows"):
        if key not in data:
            _fail(path, "", f"missing required key {key!r}")
    _check_type(path, "title", data["title"], (str,), "a string")
    task = data.get("task", "train")
    if task not in _TASKS:
        _fail(path, "task", f"must be one of {', '.join(_TASKS)}, got {task!r}")
    benchmark = _check_benchmark(path, "benchmark", data.get("benchmark"))
    dataset = data.get("dataset", "ade20k")
    if dataset not in _DATASETS:
        _fail(path, "dataset", f"must be one of {', '.join(_DATASETS)}, got {dataset!r}")
    top_model = _check_model(path, "model", data["model"]) if "model" in data else None
    base_cac = _check_cac(path, "cac", data.get("cac", True)) or {}
    seeds = _check_seeds(path, "seeds", data.get("seeds", 3))
    presets = data.get("presets") or {}
    if not isinstance(presets, Mapping):
        _fail(path, "presets", "must be a mapping of preset names")
    for name, adj in presets.items():
        if name not in PRESETS:
            _fail(path, f"presets.{name}", f"unknown preset (known: {', '.join(sorted(PRESETS))})")
        _check_keys(path, f"presets.{name}", adj, _PRESET)
        if "seeds" in adj:
            _check_seeds(path, f"presets.{name}.seeds", adj["seeds"])
        if "model" in adj:
            adj = {**adj, "model": _check_model(path, f"presets.{name}.model", adj["model"])}
            presets = {**presets, name: adj}
        _check_overrides(path, f"presets.{name}.overrides", adj.get("overrides"))
        _check_benchmark(path, f"presets.{name}.benchmark", adj.get("benchmark"))
        adjust = adj.get("classifier") or {}
        _check_keys(path, f"presets.{name}.classifier", adjust, _other_classifiers())
        for kind, options in adjust.items():
            _check_classifier(path, f"presets.{name}.classifier.{kind}", {**dict(options or {}), "type": kind})
    rows_data = data["rows"]
    if not isinstance(rows_data, list) or not rows_data:
        _fail(path, "rows", "must be a non-empty list")
    rows: list[Row] = []
    for i, r in enumerate(rows_data):
        where = f"rows[{i}]"
        _check_keys(path, where, r, _ROW)
        for key in ("label", "description"):
            if key not in r:
                _fail(path, where, f"missing required key {key!r}")
            _check_type(path, f"{where}.{key}", r[key], (str,), "a string")
        where = f"rows[{i}] {r['label']}"
        if any(x.label == r["label"] for x in rows):
            _fail(path, where, "duplicate row label")
        model = _check_model(path, f"{where}.model", r["model"]) if "model" in r else top_model
        if model is None:
            _fail(path, where, "no model (set `model` at the top or in the row)")
        classifier = None
        if "classifier" in r:
            if r.get("cac", False) not in (False, None):
                _fail(path, where, "a row has CAC (`cac:`) or another classifier (`classifier:`), not both")
            classifier = _check_classifier(path, f"{where}.classifier", r["classifier"])
        row_cac = False if classifier is not None else r.get("cac", True)
        cac = _check_cac(path, f"{where}.cac", row_cac)
        if cac is not None:
            cac = {**base_cac, **cac}
            _check_cac(path, f"{where}.cac", cac)
        only = r.get("presets")
        if only is not None:
            if not isinstance(only, list) or not only or any(name not in PRESETS for name in only):
                _fail(path, f"{where}.presets", f"must be a non-empty list of presets ({', '.join(sorted(PRESETS))}), "
                                                f"got {only!r}")
            only = tuple(only)
        rows.append(Row(r["label"], r["description"], cac, copy.deepcopy(model),
                        _check_overrides(path, f"{where}.overrides", r.get("overrides")),
                        _check_paper(path, f"{where}.paper", r.get("paper")), classifier, only))
    baseline = data.get("baseline")
    if baseline is not None and not any(r.label == baseline for r in rows):
        _fail(path, "baseline", f"no row labelled {baseline!r}")
    compare = data.get("compare")
    if compare is not None and (not any(r.label == compare for r in rows) or compare == baseline):
        _fail(path, "compare", f"no row labelled {compare!r} other than the baseline")
    return Spec(path=path, name=path.stem, title=data["title"], description=data.get("description", ""),
                dataset=dataset, baseline=baseline, seeds=seeds,
                overrides=_check_overrides(path, "overrides", data.get("overrides")),
                presets={k: dict(v) for k, v in presets.items()}, rows=rows, task=task, benchmark=benchmark,
                compare=compare)


def read_yaml(path: Path, what: str = "spec") -> Any:
    """A YAML file's data; a missing file or a YAML error is a one-line ``SpecError``."""
    if not path.is_file():
        raise SpecError(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: YAML error{at}: {getattr(err, 'problem', None) or err}") from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec; any problem is a one-line ``SpecError`` naming file and key."""
    path = Path(path)
    return parse_spec(read_yaml(path), path)


def select_rows(spec: Spec, rows: Optional[str], preset: Optional[str] = None) -> list[Row]:
    """``--rows "(a),(f)"`` -> those rows in spec order (of those that exist at ``preset``, when given);
    unknown labels are refused."""
    if not rows:
        return list(spec.rows) if preset is None else spec.rows_for(preset)
    wanted = [r.strip() for r in rows.split(",") if r.strip()]
    labels = [r.label for r in spec.rows]
    for w in wanted:
        if w not in labels:
            raise SpecError(f"{spec.path}: --rows: no row {w!r}; rows are {', '.join(labels)}")
    chosen = [r for r in spec.rows if r.label in wanted]
    if preset is not None:
        absent = [r.label for r in chosen if r not in spec.rows_for(preset)]
        if absent:
            raise SpecError(f"{spec.path}: --rows: {', '.join(absent)} exist only at preset(s) "
                            f"{', '.join(next(r for r in chosen if r.label == absent[0]).presets)}, not {preset}")
    return chosen


REPO = Path(__file__).resolve().parents[2]


def slug(text: str) -> str:
    """A label (``(e)``, ``fcn-mv2+cac``) as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "row"


def spec_files(root: Path = REPO) -> list[Path]:
    """The paper's specs in table order: Table 1 (per dataset), then Tables 2-6."""
    return sorted((root / "experiments").glob("table1_*.yaml")) + sorted((root / "ablations").glob("table*.yaml"))


def find_spec(name: str, root: Path = REPO) -> Path:
    """A spec by path, or by stem among the repo's specs (``table3``, ``table1_ade20k``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise SpecError(f"spec file {path} not found")
        return path
    known = spec_files(root)
    for p in known:
        if p.stem == name:
            return p
    raise SpecError(f"no spec {name!r}; known: {', '.join(p.stem for p in known)}")
