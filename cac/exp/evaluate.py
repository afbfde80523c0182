"""``cac-exp eval``: evaluate any checkpoint as a spec row's model, tracked as an MLflow evaluation run.

The row's resolved config (at a preset) gives the model and the val data; the checkpoint is read
weights-only (:mod:`cac.mmseg.checkpoint`) and loaded with strict key checking before anything is
tracked, so a wrong head, class count or a truncated file ends in one line and no run. Evaluation runs
live in their own experiment, ``<spec>/eval``, tagged ``kind=eval``: they never count as training
runs (a FINISHED training run skips a unit; an evaluation must not), while reports may fall back to
them where a table has no training run (Table 1 from released weights).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Optional

from cac.errors import CacError
from cac.exp.options import run_options
from cac.exp.runner import RunUnit, ensure_data, evaluate_multiscale, make_unit
from cac.exp.spec import load_spec
from cac.exp.tracking import RunTracker, flatten, git_commit, resolve_tracking_uri

__all__ = ["EVAL_SUFFIX", "eval_experiment", "file_sha256", "read_checkpoint", "evaluate_checkpoint", "import_official",
           "cmd_eval", "cmd_import"]

EVAL_SUFFIX = "/eval"


def eval_experiment(spec_name: str) -> str:
    """The MLflow experiment of a spec's evaluation runs."""
    return spec_name + EVAL_SUFFIX


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str) -> dict:
    """The checkpoint as a dict with a ``state_dict``, read without running code from it; a missing,
    truncated or foreign file is a one-line :class:`CacError`."""
    from cac.mmseg.checkpoint import load_checkpoint_file, load_url_checkpoint

    try:
        remote = str(path).startswith(("http://", "https://"))
        ckpt = load_url_checkpoint(path, "cpu") if remote else load_checkpoint_file(path, "cpu")
    except FileNotFoundError:
        raise CacError(f"checkpoint {path} not found") from None
    except CacError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # torch's zip reader, a short pickle
        raise CacError(f"checkpoint {path} is not a readable torch checkpoint "
                       f"({str(err).splitlines()[0][:160]})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
        return {"state_dict": ckpt, "meta": {}}  # a bare state dict
    raise CacError(f"checkpoint {path} holds no model state_dict")


def _mismatch_line(err: str) -> str:
    """mmengine's strict-load report, shortened to counts and the first keys of each kind."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    parts = []
    for head in ("unexpected key in source state_dict:", "missing keys in source state_dict:"):
        hit = next((ln for ln in lines if ln.startswith(head)), None)
        if hit:
            keys = [k.strip() for k in hit[len(head):].split(",") if k.strip()]
            parts.append(f"{len(keys)} {head.split(' in ')[0].replace('key', 'keys')} ({', '.join(keys[:3])}"
                         f"{', ...' if len(keys) > 3 else ''})")
    sizes = [ln for ln in lines if ln.startswith("size mismatch")]
    if sizes:
        parts.append(f"{len(sizes)} reshaped ({sizes[0][:140]})")
    return "; ".join(parts) or lines[-1][:200]


def _build_runner(unit: RunUnit, work_dir: Path):
    from mmengine.runner import Runner

    from cac.mmseg.config import runner_config

    cfg = runner_config(unit.cfg)
    cfg.load_from, cfg.resume = None, False
    cfg.work_dir = str(work_dir)
    cfg.log_level = os.environ.get("CAC_LOG_LEVEL", "ERROR")
    return Runner.from_cfg(cfg)


def _load_strict(model, ckpt: dict, path: str) -> None:
    """Every key of the model from the checkpoint, with the same shapes, and nothing else."""
    from mmengine.runner.checkpoint import load_state_dict

    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
    try:
        load_state_dict(model, state, strict=True)
    except RuntimeError as err:
        raise CacError(f"checkpoint {path} does not fit the row's model: {_mismatch_line(str(err))}") from None


def evaluate_checkpoint(spec_path: str, row: str, preset: str, checkpoint: str, *, multiscale: bool = False,
                        tracking_uri: Optional[str] = None, profile: Optional[str] = None,
                        echo: Callable[[str], None] = print, options=None) -> dict:
    """Evaluate ``checkpoint`` as ``row`` of the spec at ``preset``; returns the logged metrics."""
    import torch

    from cac.mmseg.evaluation import evaluate_pass, explain_artifacts, explain_metrics, iou_from_confusion

    spec = load_spec(spec_path)
    ckpt = read_checkpoint(checkpoint)
    meta = ckpt.get("meta") or {}
    cac_extra = dict(meta.get("cac_options") or {})  # written by import-official: the options it needs
    if profile:
        cac_extra["profile"] = profile
    target = spec.row(row)
    if target.cac is None and cac_extra:
        raise CacError(f"row {row} has no CAC, but the checkpoint needs CAC options {cac_extra}")
    unit = make_unit(spec, target, 0, preset, cac_extra=cac_extra or None, options=options)
    ensure_data(unit)
    local = Path(checkpoint)
    digest = file_sha256(local) if local.is_file() else hashlib.sha256(checkpoint.encode()).hexdigest()
    work_dir = unit.work_dir.parent / "eval" / digest[:12]
    runner = _build_runner(unit, work_dir)
    _load_strict(runner.model, ckpt, checkpoint)  # before any run is opened: a misfit leaves nothing behind

    uri = resolve_tracking_uri(tracking_uri)
    tags = {**unit.tags, "kind": "eval", "checkpoint": str(checkpoint)[-250:], "checkpoint_sha256": digest}
    tracker = RunTracker.open(uri, eval_experiment(spec.name), tags, f"eval {unit.name}")
    try:
        from cac.exp.provenance import run_tags

        tracker.set_tags({"git_commit": git_commit(), "model": unit.model, "base_model": unit.model,
                          "description": target.description, **run_tags("cac-exp eval")})
        tracker.log_params({**{f"setting.{k}": v for k, v in unit.settings().items()},
                            **flatten(unit.cfg.get("model", {}), "cfg.model."), **unit.options.params()})
        t0 = time.time()
        scores = runner.test()
        metrics = {f"val/{k}": float(v) for k, v in scores.items() if k in ("mIoU", "mAcc", "aAcc")}
        num_classes = len(runner.test_dataloader.dataset.metainfo["classes"])
        result = evaluate_pass(runner.model, runner.test_dataloader, num_classes, explain=True)
        confs = result.confusion
        short = {"p": "p", "p_p": "pp", "p_y": "py"}
        metrics.update({f"val/mIoU_{short[k]}": iou_from_confusion(c)[1] for k, c in confs.items()})
        metrics.update(explain_metrics(result))  # val/ece_*, val/changed_pixels, ... as training runs log them
        if multiscale:
            metrics["val/mIoU_ms"] = evaluate_multiscale(unit, Path(checkpoint), work_dir=work_dir / "ms")
        metrics["time/eval_seconds"] = time.time() - t0
        tracker.log_metrics(metrics, 0)
        conf = confs.get("p_p" if unit.row.cac is not None and "p_p" in confs else "p")
        if conf is not None:
            iou = iou_from_confusion(conf)[0]
            classes = runner.test_dataloader.dataset.metainfo["classes"]
            table = work_dir / "per_class_iou.csv"
            table.parent.mkdir(parents=True, exist_ok=True)
            table.write_text("class,iou\n" + "".join(f"{c},{'' if torch.isnan(v) else round(float(v) * 100, 2)}\n"
                                                       for c, v in zip(classes, iou)))
            tracker.log_artifact(table)
            for path in explain_artifacts(result, classes, work_dir):
                tracker.log_artifact(path)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    echo(f"eval  {unit.name}: val mIoU {metrics.get('val/mIoU', float('nan')):.2f}"
         + "".join(f", {k.split('/')[1]} {v:.2f}" for k, v in metrics.items() if k.startswith("val/mIoU_"))
         + f" (run {tracker.run_id} in {eval_experiment(spec.name)})")
    return metrics


def cmd_eval(args) -> int:
    from cac.mmseg.checkpoint import trust_all

    with trust_all(args.trust_checkpoint):
        evaluate_checkpoint(args.spec, args.row, args.preset, args.checkpoint, multiscale=args.ms,
                            tracking_uri=args.tracking_uri, profile=args.profile, options=run_options(args))
    return 0


def import_official(checkpoint: str, spec_path: str, row: str, out: str, preset: str = "paper",
                    echo: Callable[[str], None] = print) -> Path:
    """Convert an official CAC checkpoint into the row's ``profile: official`` model, load it strictly
    (every unmatched or reshaped key named in one line), and save it as a plain weights file."""
    import torch

    from cac.mmseg.official import cac_head_prefix, convert_official_state_dict
    from cac.mmseg.params import build_model

    spec = load_spec(spec_path)
    target = spec.row(row)
    if target.cac is None:
        raise CacError(f"row {row} has no CAC; official CAC checkpoints are +CAC models")
    ckpt = read_checkpoint(checkpoint)
    unit = make_unit(spec, target, 0, preset, cac_extra={"profile": "official"})
    torch.manual_seed(0)
    model = build_model(unit.cfg["model"])
    prefix = cac_head_prefix(model.state_dict())
    converted = convert_official_state_dict(ckpt["state_dict"], prefix)
    _load_strict(model, {"state_dict": converted}, checkpoint)
    meta = ckpt.get("meta") or {}
    source = Path(checkpoint)
    new_meta = {"cac_options": {"profile": "official"}, "converted_from": str(checkpoint), "row": row,
                "source_sha256": file_sha256(source) if source.is_file() else "",
                "dataset_meta": {"classes": tuple(meta.get("CLASSES") or meta.get("dataset_meta", {}).get("classes")
                                                  or ()),
                                 "palette": [list(p) for p in (meta.get("PALETTE") or [])]}}
    target_path = Path(out)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": new_meta}, target_path)
    echo(f"wrote {target_path}: {len(converted)} tensors of the official checkpoint as {spec.name} {row} "
         f"(profile official); evaluate with `cac-exp eval {spec_path} --row \"{row}\" --preset {preset} "
         f"--checkpoint {target_path}`")
    return target_path


def cmd_import(args) -> int:
    from cac.mmseg.checkpoint import trust_all

    with trust_all(args.trust_checkpoint):
        import_official(args.checkpoint, args.spec, args.row, args.out, preset=args.preset)
    return 0
