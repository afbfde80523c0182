"""``cac-exp run``: a spec's rows x seeds at one preset, trained by mmengine's Runner, tracked in MLflow.

Rules: a row x seed x preset whose resolved config has a FINISHED run is skipped; an unfinished one
(crashed, killed) is resumed from its last checkpoint in the same MLflow run; a run another process is
training right now (its work dir is locked) is left alone.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from cac.mmseg.config import config_hash, dump_config, resolve_config, runner_config
from cac.errors import CacError
from cac.mmseg.presets import get_preset
from cac.exp.options import RunOptions, apply_run_options
from cac.exp.spec import Row, Spec, load_spec, select_rows, slug
from cac.exp.workdirs import claim_work_dir, read_owner, work_dir_lock
from cac.exp.tracking import (RunTracker, find_runs, find_runs_anywhere, flatten, git_commit, git_dirty,
                              resolve_tracking_uri)

__all__ = ["RunUnit", "plan_runs", "run_spec", "train_unit", "ensure_data", "evaluate_multiscale", "WORK_ROOT"]

WORK_ROOT = Path(os.environ.get("CAC_WORK_DIR", "work_dirs"))


def data_version(preset: str, dataset: str, expected: Optional[dict] = None) -> str:
    """The data a unit trains on: the generator's version, or a real dataset's name (with the subset
    sizes when ``--expected-train/--expected-val`` declare one: a subset is other data)."""
    p = get_preset(preset)
    if p.embedded:
        from cac.data import context_scenes

        return context_scenes.data_version(p.data)
    subset = "".join(f"-{k}{v}" for k, v in sorted((expected or {}).items()))
    return f"{dataset}-subset{subset}" if subset else dataset


@dataclass
class RunUnit:
    """One row x seed x preset: its resolved config, where it trains, and how MLflow knows it."""

    spec: Spec
    row: Row
    seed: int
    preset: str
    model: str
    cfg: dict
    cfg_hash: str
    work_dir: Path
    extra_tags: dict = field(default_factory=dict)
    options: RunOptions = field(default_factory=RunOptions)
    dataset: str = ""  # the data it trains on at preset paper: the spec's, or a user config's own

    @property
    def name(self) -> str:
        return f"{self.spec.name} {self.row.label} seed={self.seed} {self.preset}"

    @property
    def identity(self) -> dict:
        """What makes two units the same training run, whichever spec plans them: the resolved config
        (seed included), the data version and the preset."""
        return {"config_hash": self.cfg_hash, "data_version": self.extra_tags.get("data_version", ""),
                "preset": self.preset, "seed": self.seed}

    @property
    def tags(self) -> dict:
        return {"spec": self.spec.name, "row": self.row.label, "seed": self.seed, "preset": self.preset,
                "config_hash": self.cfg_hash, **self.extra_tags}

    def settings(self) -> dict:
        """The key settings, flattened: what a reader of the plan or the MLflow params wants."""
        out = {"model": self.model, "cac": "off" if self.row.cac is None else "on", "seed": self.seed,
               "preset": self.preset, "dataset": self.dataset or self.spec.dataset, "classifier": self.row.kind}
        if self.row.cac is not None:
            from cac.core.classifier import CACOptions

            out.update({f"cac.{k}": v for k, v in CACOptions.from_dict(self.row.cac).to_dict().items()})
        if self.row.classifier is not None:
            from cac.core.classifiers import split_classifier

            kind, opts = split_classifier(self.row.classifier)
            out.update({f"{kind.name}.{k}": v for k, v in opts.to_dict().items()})
        return out


def make_unit(spec: Spec, row: Row, seed: int, preset: str, *, cac_extra: Optional[dict] = None,
              overrides_extra: Optional[dict] = None, extra_tags: Optional[dict] = None,
              work_root: Optional[Path] = None, options: Optional[RunOptions] = None) -> RunUnit:
    """``cac_extra``: options merged over the row's classifier's (CAC's, or its other classifier's: a
    sweep's point)."""
    import dataclasses

    from cac.mmseg.config import dataset_of_config, existing_cac
    from cac.mmseg.zoo import resolve_model

    options = options or RunOptions()
    model = options.model or spec.model_for(row, preset)  # --model: Spec.with_model for a single row
    entry = resolve_model(model)
    if cac_extra and row.classifier is not None:
        row = dataclasses.replace(row, classifier={**row.classifier, **cac_extra})
    elif cac_extra and row.cac is not None:
        row = dataclasses.replace(row, cac={**row.cac, **cac_extra})
    if row.classifier is not None:  # the preset's options for its kind: what trains is what is logged
        row = dataclasses.replace(row, classifier=spec.classifier_for(row, preset))
    cac = row.cac
    cfg = resolve_config(model, preset, cac=cac if cac is not None else False, classifier=row.classifier,
                         overrides={**spec.overrides_for(row, preset), **(overrides_extra or {})},
                         seed=seed, dataset=spec.dataset)
    cfg = apply_run_options(cfg, options, embedded=get_preset(preset).embedded, config_name=entry.config,
                            where=f"{spec.name} {row.label}")
    curve_settings(cfg.get("cac_curve"))  # a bad one is refused at planning, before anything is tracked
    digest = config_hash(cfg)
    # A user's config that already has CAC: the rows' settings replace its own; the run says so.
    own = existing_cac(model) if entry.own_data else None
    replaced = {} if own is None else {"config_cac": json.dumps(own, sort_keys=True)}
    # The data a unit trains on: an embedded preset's generated scenes whatever the spec's dataset (the
    # paper's); at preset paper, a user's config trains on its own data, a spec's models on the spec's.
    if get_preset(preset).embedded:
        from cac.data.context_scenes import NAME as dataset
    else:
        dataset = dataset_of_config(cfg) if entry.own_data else spec.dataset
    # The data version is part of a unit's identity (its tags and its work dir): after the generator
    # changes, an unchanged config is neither skipped as done nor resumed from the old data's checkpoint.
    version = data_version(preset, dataset, dict(options.expected))
    work_dir = ((work_root or WORK_ROOT) / spec.name / preset / slug(version)
                / f"{slug(row.label)}-s{seed}-{digest[:8]}")
    cfg["work_dir"] = str(work_dir)
    return RunUnit(spec, row, seed, preset, entry.name, cfg, digest, work_dir,
                   {"data_version": version, **replaced, **(extra_tags or {})}, options, dataset)


def replaced_cac_note(unit: RunUnit) -> Optional[str]:
    """One line when the unit's base config already had CAC (``config_cac`` tag), else None."""
    own = unit.extra_tags.get("config_cac")
    if own is None:
        return None
    what = "its own CAC settings are replaced by the row's" if unit.row.cac is not None else "the row trains the head its CACHead wraps"
    return f"note  {unit.model}: the config already has CAC ({own}); {what}"


def plan_runs(spec: Spec, preset: str, rows: Optional[str] = None, seeds: Optional[int] = None,
              options: Optional[RunOptions] = None) -> list[RunUnit]:
    get_preset(preset)
    return [make_unit(spec, row, seed, preset, options=options) for row in select_rows(spec, rows, preset)
            for seed in spec.seeds_for(preset, seeds)]


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """The objects that exist before a run (imported modules, registries: millions in a long-lived
    process) are set aside from the garbage collector while it trains: mmengine calls ``gc.collect()``
    for every dataset it builds, and each call then scans what the run allocated, not the whole heap
    (0.1 s a call otherwise in a ``cac-exp`` process, more in a long-lived one; ``benchmarks/cpu_overheads.py``).
    Nothing is lost: they are collectable again afterwards. A heap some other code froze is left as it is."""
    if gc.get_freeze_count():  # frozen by the code that runs cac: its choice, which unfreeze() would undo
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def shared_run(unit: RunUnit, uri: str):
    """A FINISHED training run of another spec with this unit's identity (Table 3 (a) is Table 2 (d)),
    or None. Evaluation runs of released checkpoints never count as training."""
    runs = [r for r in find_runs_anywhere(uri, unit.identity, statuses=["FINISHED"], exclude_tags={"kind": "eval"})
            if r.data.tags.get("spec") != unit.spec.name]
    return min(runs, key=lambda r: r.info.start_time or 0) if runs else None


def unit_state(unit: RunUnit, uri: str) -> tuple[str, Optional[str]]:
    """('finished' | 'shared' | 'resume' | 'new', run_id) from the runs MLflow holds for this unit;
    'shared' names another spec's FINISHED run of the same identity, which this spec counts as its own."""
    runs = find_runs(uri, unit.spec.name, unit.tags)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return "finished", finished[0].info.run_id
    shared = shared_run(unit, uri)
    if shared is not None:
        return "shared", shared.info.run_id
    open_runs = sorted((r for r in runs if r.info.status in ("RUNNING", "SCHEDULED", "KILLED", "FAILED")),
                       key=lambda r: r.info.start_time or 0, reverse=True)
    return ("resume", open_runs[0].info.run_id) if open_runs else ("new", None)


def _close_stale(unit: RunUnit, uri: str, keep: str) -> None:
    """Any other open run of the same unit is marked KILLED, so none stays RUNNING."""
    for r in find_runs(uri, unit.spec.name, unit.tags, statuses=["RUNNING", "SCHEDULED"]):
        if r.info.run_id != keep:
            RunTracker(uri, r.info.run_id).finish("KILLED")


def ensure_data(unit: RunUnit) -> None:
    """Generated data is made on demand (deterministic); real data must be there, or one clear line."""
    preset = get_preset(unit.preset)
    if preset.embedded:
        from cac.data import context_scenes

        context_scenes.ensure(preset.data)
        return
    from cac.data.real import known_dataset, verify

    dataset = unit.dataset or unit.spec.dataset
    if known_dataset(dataset):
        verify(dataset, unit.cfg.get("data_root"), dict(unit.options.expected) or None)
        return
    root = unit.cfg.get("data_root")  # a user's own dataset: its layout is the dataset class's business
    if isinstance(root, str) and not Path(root).is_dir():
        raise CacError(f"{unit.name}: the model config's data_root {root} does not exist "
                       "(relative roots are under $CAC_DATA_ROOT)")


def init_distributed(launcher: str) -> None:
    """nccl through mmengine on GPUs; on CPUs gloo directly (mmengine's init would call cuda.set_device)."""
    import torch

    if torch.cuda.is_available():
        from mmengine.dist import init_dist

        init_dist(launcher, backend="nccl")
    else:
        import torch.distributed as dist

        dist.init_process_group(backend="gloo")


def is_main_process() -> bool:
    from mmengine.dist import get_rank

    return get_rank() == 0


def broadcast(obj):
    from mmengine.dist import broadcast_object_list, get_world_size

    if get_world_size() == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, src=0)
    return box[0]


def resume_checkpoint(work_dir: Path) -> Optional[Path]:
    """The newest complete ``iter_N.pth`` in ``work_dir``, or None.

    Not mmengine's ``last_checkpoint`` pointer: mmengine deletes the previous checkpoint before it
    rewrites the pointer, so a kill in between leaves it naming a deleted file; and a kill during
    ``torch.save`` leaves a truncated file (a checkpoint is a zip archive, so that is checked).
    """
    import zipfile

    def iteration(p: Path) -> int:
        return int(p.stem.split("_")[-1]) if p.stem.split("_")[-1].isdigit() else -1

    for path in sorted(work_dir.glob("iter_*.pth"), key=iteration, reverse=True):
        if zipfile.is_zipfile(path):
            return path
    return None


def _import_custom_modules(cfg) -> None:
    """The config's ``custom_imports`` (a spec's own hooks or datasets). mmengine imports them only in
    ``Config.fromfile``; the runner builds its Config from a dict, so it imports them itself."""
    imports = cfg.get("custom_imports")
    if imports:
        from mmengine.utils import import_modules_from_strings

        import_modules_from_strings(**imports)


CURVE_POINTS = 8  # three-classifier evaluations per run at least: the curves of Fig. 4
# A config's ``cac_curve`` (a spec override such as ``cac_curve.points: 2``): how dense Fig. 4's curve
# is and on how many images; the defaults when the config has none.
CURVE_DEFAULTS = {"points": CURVE_POINTS, "train_images": 32, "val_images": 96}


def curve_settings(value: Any) -> dict:
    """The config's ``cac_curve`` over the defaults; a bad one is one CacError line."""
    value = {} if value is None else value
    if not isinstance(value, Mapping) or set(value) - set(CURVE_DEFAULTS):
        raise CacError(f"cac_curve: a mapping of {', '.join(CURVE_DEFAULTS)}, got {value!r}")
    out = {**CURVE_DEFAULTS, **value}
    for key, val in out.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if key == "points" else 1):
            raise CacError(f"cac_curve.{key}: an integer >= {0 if key == 'points' else 1}, got {val!r}")
    return out


def curve_interval(max_iters: int, val_interval: int = 0, points: int = CURVE_POINTS) -> int:
    """Iterations between evaluations of the three classifiers: the val interval, or less, so a run
    has at least ``points`` points (the last one is always at ``max_iters``); ``points=0``: at the
    val interval only."""
    every = max(1, max_iters // points) if max_iters and points else 0
    return min(val_interval or every, every) if every else val_interval


def train_unit(unit: RunUnit, tracker: Optional[RunTracker], *, launcher: str = "none",
               progress: bool = True, on_eval: Optional[Callable] = None) -> dict:
    """Train (or resume) one unit with mmengine's Runner; returns its final metrics."""
    from mmengine.runner import Runner

    from cac.mmseg.evaluation import iou_from_confusion
    from cac.mmseg.hooks import EVALUATION_PRIORITY, EvaluationHook, TrackingHook

    cfg = runner_config(unit.cfg)  # tuples stay tuples: mmseg transforms check for them
    cfg.launcher = launcher
    _import_custom_modules(cfg)
    ckpt = resume_checkpoint(unit.work_dir)
    cfg.resume, cfg.load_from = ckpt is not None, None if ckpt is None else str(ckpt)
    cfg.log_level = os.environ.get("CAC_LOG_LEVEL", "ERROR")  # the progress bar replaces mmengine's INFO lines
    if launcher != "none":
        import torch

        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "nccl" if torch.cuda.is_available() else "gloo"
        # device_ids=None lets DDP wrap CPU modules. Parameters no row trains are frozen by CACHead (theta_y
        # without L_y^ce, a cosine C's bias), so stock DDP (find_unused_parameters=False) trains every row.
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", broadcast_buffers=False,
                                     find_unused_parameters=False)
        if not torch.cuda.is_available():
            cfg.model_wrapper_cfg["device_ids"] = None
    runner = Runner.from_cfg(cfg)
    max_iters = cfg.train_cfg.get("max_iters", 0)
    interval = cfg.train_cfg.get("val_interval", 0) or max_iters
    curve = curve_settings(cfg.get("cac_curve"))
    hook = TrackingHook(tracker, interval=interval, log_interval=max(1, min(10, interval)),
                        label=f"{unit.row.label} s{unit.seed}", progress=progress and is_main_process(),
                        on_eval=on_eval, curve_interval=curve_interval(max_iters, interval, curve["points"]),
                        train_subset=curve["train_images"], val_subset=curve["val_images"])
    runner.register_hook(hook, priority="LOW")  # the loss guard runs before a checkpoint is written
    runner.register_hook(EvaluationHook(hook), priority=EVALUATION_PRIORITY)  # and the evaluations after it
    from cac.mmseg.checkpoint import trusted_dir

    import urllib.error

    with trusted_dir(unit.work_dir):  # resuming reads this unit's own checkpoints, which it wrote
        try:
            runner.train()
        except urllib.error.URLError as err:  # mmengine's open-mmlab:// and mmcls:// loaders download directly
            sources = ", ".join(pretrained_sources(unit.cfg.get("model", {}))) or "named in the config"
            raise CacError(f"cannot download the pretrained weights {sources} ({err.reason}); offline, "
                           "put the file in torch hub's cache (~/.cache/torch/hub/checkpoints) or use --no-pretrained") from None
    metrics = {k.replace("mmseg/", ""): float(v) for k, v in _last_val(runner).items()}
    if hook.final_confusion is not None:
        iou, miou = iou_from_confusion(hook.final_confusion)
        metrics["per_class_iou"] = iou.tolist()
        metrics["check_mIoU"] = miou
    return metrics


def pretrained_sources(node) -> list[str]:
    """The pretrained checkpoints a model config loads (``pretrained=`` and ``init_cfg`` of type Pretrained)."""
    out: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("pretrained"), str):
            out.append(node["pretrained"])
        init = node.get("init_cfg")
        if isinstance(init, dict) and init.get("type") == "Pretrained" and isinstance(init.get("checkpoint"), str):
            out.append(init["checkpoint"])
        for value in node.values():
            out += [s for s in pretrained_sources(value) if s not in out]
    elif isinstance(node, list):
        for value in node:
            out += [s for s in pretrained_sources(value) if s not in out]
    return out


def evaluate_multiscale(unit: RunUnit, checkpoint: Path, work_dir: Optional[Path] = None) -> float:
    """Multi-scale (0.5-1.75) + flip mIoU of a trained unit through mmseg's SegTTAModel, as
    mmseg's ``tools/test.py --tta`` does it (Table 1's "m.s.")."""
    from mmengine.runner import Runner

    cfg = runner_config(unit.cfg)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.test_dataloader.batch_size = 1  # TTA batches hold every augmented view of one image
    cfg.tta_model = dict(type="SegTTAModel", module=cfg.model)
    cfg.model = cfg.tta_model
    cfg.load_from, cfg.resume = str(checkpoint), False
    cfg.work_dir = str(work_dir or unit.work_dir / "ms")
    _import_custom_modules(cfg)
    cfg.log_level = os.environ.get("CAC_LOG_LEVEL", "ERROR")
    metrics = Runner.from_cfg(cfg).test()
    return float(metrics["mIoU"])


def _final_checkpoint(unit: RunUnit) -> Path:
    return unit.work_dir / f"iter_{int(unit.cfg['train_cfg'].get('max_iters', 0))}.pth"


def _add_multiscale(unit: RunUnit, uri: str, run_id: str, echo: Callable[[str], None]) -> None:
    """Log ``val/mIoU_ms`` to a FINISHED run that lacks it (training is not redone)."""
    tracker = RunTracker(uri, run_id)
    if "val/mIoU_ms" in tracker.client.get_run(run_id).data.metrics:
        return
    ckpt = _final_checkpoint(unit)
    if not ckpt.is_file():
        echo(f"ms    {unit.name}: no local checkpoint {ckpt}; multi-scale evaluation skipped")
        return
    miou = evaluate_multiscale(unit, ckpt)
    tracker.log_metrics({"val/mIoU_ms": miou}, int(unit.cfg["train_cfg"].get("max_iters", 0)))
    echo(f"ms    {unit.name}: multi-scale + flip val mIoU {miou:.2f}")


def _last_val(runner) -> dict:
    """mmseg's IoUMetric results from the last validation (mIoU, mAcc, aAcc, in %)."""
    hub = runner.message_hub
    out = {}
    for key in ("mIoU", "mAcc", "aAcc"):
        with contextlib.suppress(KeyError):
            out[key] = hub.get_scalar(f"val/{key}").current()
    return out


def _log_final(unit: RunUnit, tracker: RunTracker, metrics: dict, classes: list[str], seconds: float) -> None:
    step = int(unit.cfg["train_cfg"].get("max_iters", 0))
    final = {f"val/{k}": v for k, v in metrics.items() if k in ("mIoU", "mAcc", "aAcc")}
    final["time/train_seconds"] = seconds
    tracker.log_metrics(final, step)
    out_dir = unit.work_dir / "artifacts"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.py"
    dump_config(unit.cfg, cfg_path)
    tracker.log_artifact(cfg_path)
    if "per_class_iou" in metrics:
        table = out_dir / "per_class_iou.csv"
        rows = ["class,iou"] + [f"{c},{'' if v != v else round(v * 100, 2)}"
                                for c, v in zip(classes, metrics["per_class_iou"])]
        table.write_text("\n".join(rows) + "\n")
        tracker.log_artifact(table)
    ckpt = unit.work_dir / f"iter_{step}.pth"
    if ckpt.is_file():
        tracker.log_artifact(ckpt, "checkpoint")


def run_spec(spec_path: str, preset: str = "quick", rows: Optional[str] = None, seeds: Optional[int] = None,
             tracking_uri: Optional[str] = None, dry_run: bool = False, launcher: str = "none",
             multiscale: bool = False, echo: Callable[[str], None] = print,
             options: Optional[RunOptions] = None,
             execute: Optional[Callable[[list], int]] = None) -> int:
    """The ``cac-exp run`` command. Returns the exit code. ``execute(units)`` trains the units to be
    trained elsewhere (submitit jobs: ``cac.exp.dispatch``) and returns how many failed."""
    import dataclasses

    spec = load_spec(spec_path)
    if spec.task != "train":
        raise CacError(f"{spec.path}: task {spec.task!r} is not trained; `cac-exp run` dispatches it")
    options = options or RunOptions()
    plan_runs(spec, preset, rows, seeds, options)  # a bad spec or option fails before processes start
    if launcher != "none":
        init_distributed(launcher)
        from mmengine.dist import get_world_size

        options = dataclasses.replace(options, world_size=get_world_size())
    units = plan_runs(spec, preset, rows, seeds, options)
    uri = resolve_tracking_uri(tracking_uri)
    main = is_main_process()
    if main and not dry_run:  # what a killed process's journals hold reaches the store before it is read
        for unit in units:
            deliver_waiting(unit, uri, echo)
    states = broadcast([unit_state(u, uri) for u in units] if main else None)
    if dry_run:
        if main:
            _print_plan(spec, preset, units, states, uri, echo)
        return 0
    if execute is not None:
        todo = []
        for unit, (state, run_id) in zip(units, states):
            if state in ("finished", "shared"):
                echo(f"skip  {unit.name}: {'shared with ' if state == 'shared' else ''}FINISHED run {run_id}")
            else:
                todo.append(unit)
        failures = execute(todo) if todo else 0
        if failures:
            echo(f"{failures} of {len(units)} runs failed (see above); finished runs are kept")
        return 1 if failures else 0
    failures = 0
    for unit, (state, run_id) in zip(units, states):
        if state == "finished":
            if main:
                echo(f"skip  {unit.name}: FINISHED run {run_id} has this config")
        elif state == "shared":
            if main:
                echo(f"skip  {unit.name}: shared with FINISHED run {run_id} of another spec (same config, data, seed)")
        else:
            failures += 0 if execute_unit(unit, state, run_id, uri, launcher=launcher, echo=echo) is not False else 1
        if multiscale and main:
            state, run_id = unit_state(unit, uri)
            if state in ("finished", "shared"):
                _add_multiscale(unit, uri, run_id, echo)
    if main:
        from cac.exp.journal import drain_all

        drain_all(echo=echo)  # the journals' last records; a store still away leaves them for `cac-exp sync`
    if main and failures:
        echo(f"{failures} of {len(units)} runs failed (see above); finished runs are kept")
    return 1 if failures else 0


def _scale_params(unit: RunUnit) -> dict:
    """How many processes train the unit, the batch one optimizer step sees (per-process batch
    x world size x gradient-accumulation steps) and torch's CPU thread count: the same config trains differently under DDP, and
    not bit-identically on another thread count (float reductions in another order). None of them
    is in the config hash: the unit is the same experiment. A resumed run keeps the values logged
    first (MLflow params are immutable)."""
    import torch
    from mmengine.dist import get_world_size

    world = get_world_size()
    per_process = int((unit.cfg.get("train_dataloader") or {}).get("batch_size", 0))
    accumulation = int((unit.cfg.get("optim_wrapper") or {}).get("accumulative_counts", 1))  # --batch-per-gpu
    return {"world_size": world, "batch_per_gpu": per_process, "accumulation": accumulation,
            "total_batch": per_process * world * accumulation, "num_threads": torch.get_num_threads()}


def execute_unit(unit: RunUnit, state: str, run_id: Optional[str], uri: str, *, launcher: str = "none",
                 echo: Callable[[str], None] = print, on_eval: Optional[Callable] = None,
                 tags: Optional[dict] = None, offline: bool = False):
    """Train one unit in a new or reopened MLflow run. Returns its final metrics (with ``tracked``: the
    run's metrics as its store shows them once delivered), None when another process holds it, or
    False when it failed (non-finite loss). Other exceptions (interrupts, an Optuna prune) mark the
    run KILLED — resumable — and propagate; an exception's ``run_tags`` are set on the run first.

    Everything the run logs goes through its journal (``<work dir>/tracking``): training never waits
    for the store. ``offline``: the store did not answer when the job started (a requeued job during
    an outage); a resumed run then trains on, and its journal is delivered when the store is back."""
    from cac.exp.journal import JOURNAL_DIR
    from cac.exp.provenance import dataset_input, run_tags
    from cac.mmseg.hooks import NonFiniteLossError

    main = is_main_process()
    if main:  # before any MLflow run is opened: a missing dataset must leave nothing behind
        ensure_data(unit)
        note = replaced_cac_note(unit)
        if note:
            echo(note)
    if launcher != "none":
        broadcast(None)  # other ranks wait for the data
    with work_dir_lock(unit.work_dir, enabled=main) as locked:
        locked = broadcast(locked) if launcher != "none" else locked
        if not locked:
            if main:
                echo(f"busy  {unit.name}: another process is training it now")
            return None
        tracker = None
        if main:
            journal = unit.work_dir / JOURNAL_DIR
            if state == "resume":
                tracker = RunTracker(uri, run_id, journal, offline=offline)
                tracker.reopen()
                echo(f"resume {unit.name} (run {run_id})" + (" while its tracking store is away" if offline else ""))
            else:
                tracker = RunTracker.open(uri, unit.spec.name, unit.tags, unit.name, journal)
            if not offline:
                _close_stale(unit, uri, keep=tracker.run_id)
            claim_work_dir(unit.work_dir, uri, tracker.run_id, echo)
            tracker.set_tags({"git_commit": git_commit(), "git_dirty": git_dirty(),
                              "model": unit.model, "base_model": unit.model, "description": unit.row.description,
                              "work_dir": str(unit.work_dir.resolve()), **run_tags(), **(tags or {})})
            if state != "resume":  # the data the run trains on, as MLflow's dataset input
                version = unit.extra_tags.get("data_version", "")
                tracker.log_inputs([dataset_input(version, version, unit.cfg.get("data_root"))])
            tracker.log_params({**{f"setting.{k}": v for k, v in unit.settings().items()},
                                **flatten(unit.cfg.get("model", {}), "cfg.model."), **_scale_params(unit),
                                **unit.options.params()})
        t0 = time.time()
        try:
            with heap_frozen():
                metrics = train_unit(unit, tracker, launcher=launcher, on_eval=on_eval)
        except NonFiniteLossError as err:
            if tracker:
                tracker.finish("FAILED")
                tracker.settle()
            echo(f"error {unit.name}: {err}")
            return False
        except BaseException as err:
            if tracker:  # interrupted or crashed: left resumable (KILLED), never RUNNING
                if getattr(err, "run_tags", None):
                    tracker.set_tags(err.run_tags)
                tracker.finish("KILLED")
                tracker.settle()
            raise
        seconds = time.time() - t0
        if main:
            from cac.data import context_scenes

            classes = list(context_scenes.CLASSES) if unit.cfg.get("dataset_type") == "ContextScenesDataset" else []
            _log_final(unit, tracker, metrics, classes, seconds)
            tracker.finish("FINISHED")
            tracker.settle()  # FINISHED in the store when this returns, unless the store is away
            metrics["tracked"] = tracker.latest_metrics()
            echo(f"done  {unit.name}: val mIoU {metrics.get('mIoU', float('nan')):.2f} in {seconds:.0f}s "
                 f"(run {tracker.run_id})")
        return metrics


def deliver_waiting(unit: RunUnit, uri: str, echo: Callable[[str], None] = print) -> None:
    """Deliver what a unit's journals still hold for store ``uri`` (a process killed while its store
    was away), before the unit's state is read from the store: a run that finished in its journal is
    then FINISHED there, and skipped. A unit another process is training is left to that process."""
    from cac.exp.credentials import public_url
    from cac.exp.journal import JOURNAL_DIR, deliver_journal, waiting_journals

    folder = unit.work_dir / JOURNAL_DIR
    if not folder.is_dir():
        return
    journals = waiting_journals([unit.work_dir], uri)
    if not journals:
        return
    with work_dir_lock(unit.work_dir) as locked:
        if not locked:
            return
        client = RunTracker(uri, journals[0].run_id).client
        for journal in waiting_journals([unit.work_dir], uri):  # read again under the lock
            count = journal.pending()
            while journal.pending():
                deliver_journal(journal, client, lambda line: echo(f"note  {line}"))
            echo(f"sync  {unit.name}: {count} records its journal kept delivered to {public_url(uri)} "
                 f"(run {journal.run_id})")


def local_state(unit: RunUnit, uri: str) -> tuple[str, Optional[str]]:
    """A unit's state from its work dir alone, for a job that starts while its store is unreachable:
    ('finished', run) when the owner run's journal ends FINISHED, ('resume', run) for its owner run
    of this store; a unit with no run of its own here cannot start without the store (CacError)."""
    from cac.exp.credentials import public_url
    from cac.exp.journal import JOURNAL_DIR, Journal

    owner = read_owner(unit.work_dir)
    if not owner or owner["tracking_uri"] != public_url(uri) or not owner.get("run_id"):
        raise CacError(f"{unit.name}: the tracking store {public_url(uri)} is unreachable and the unit has no "
                       f"run of its own in {unit.work_dir} to resume; start it again when the store answers")
    journal = Journal(unit.work_dir / JOURNAL_DIR, owner["run_id"], uri)
    return ("finished" if journal.status == "FINISHED" else "resume"), owner["run_id"]


def _print_plan(spec: Spec, preset: str, units: list[RunUnit], states: list, uri: str,
                echo: Callable[[str], None]) -> None:
    from cac.exp.credentials import public_url

    echo(f"spec {spec.path} ({spec.title})")
    echo(f"preset {preset}; tracking {public_url(uri)}; {len(units)} runs")
    shared = {}
    for unit, (state, run_id) in zip(units, states):
        if state == "shared":
            shared[run_id] = RunTracker(uri, run_id).client.get_run(run_id).data.tags.get("spec", "?")
    for unit, (state, run_id) in zip(units, states):
        what = {"finished": f"skip (FINISHED run {run_id})", "resume": f"resume run {run_id}",
                "new": "train", "shared": f"skip, shared with {shared.get(run_id)} (FINISHED run {run_id})"}[state]
        settings = unit.settings()
        keys = ("model", "cac", "cac.profile", "cac.tau", "cac.lambda_kl", "cac.loss_ce", "cac.loss_ce_p", "cac.loss_ce_y",
                "cac.kl_entropy", "cac.kl_classwise", "cac.kl_entropy_source", "cac.original", "cac.context",
                "cac.design_y", "cac.design_p")
        # SSA-Seg's switches only where on: a CAC row's line stays as it was
        keys += tuple(k for k, v in settings.items() if k.startswith("cac.ssa_") and v)
        brief = " ".join(f"{k.replace('cac.', '')}={settings[k]}" for k in keys if k in settings)
        if unit.row.classifier is not None:  # another classifier: its type and the options the row sets
            brief += f" classifier={unit.row.kind}" + "".join(
                f" {k}={v}" for k, v in unit.row.classifier.items() if k != "type")
        echo(f"  {unit.row.label:>8} seed={unit.seed} [{unit.cfg_hash[:8]}] {what}: {brief}")
    for note in dict.fromkeys(filter(None, (replaced_cac_note(u) for u in units))):
        echo(note)
    counts = {s: sum(1 for st, _ in states if st == s) for s in ("new", "resume", "finished", "shared")}
    echo(f"plan: {counts['new']} to train, {counts['resume']} to resume, {counts['finished']} done, "
         f"{counts['shared']} shared with other specs (trainings saved: {counts['shared']})")
