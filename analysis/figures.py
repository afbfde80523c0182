"""Figures from tracked runs: the oracle curves of the paper's Fig. 4 and the masks of Fig. 6, plus
the run lookups (matched runs, configs, checkpoints, models) the t-SNE script shares.

A run's model is rebuilt from the run itself: its resolved config (``artifacts/config.py`` in the
local work dir, else the MLflow artifact) and its last checkpoint (the local ``iter_N.pth``, else the
``checkpoint/`` artifact), so figures never depend on how the spec reads today.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on this machine

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cac.exp.results import matched_runs  # noqa: E402  (re-exported: the runs the tables count)
from cac.exp.spec import Row, Spec, slug  # noqa: E402

__all__ = ["matched_runs", "full_cac_row", "metric_history", "plot_oracle_curves", "save_figure",
           "run_work_dir", "run_config", "run_checkpoint", "load_run_model", "build_val_dataset",
           "val_batch", "predict_masks", "colorize", "plot_masks", "oracle_curves_figure", "masks_figure",
           "pick_seed", "evenly_spaced", "run_artifact_text", "read_class_table", "train_pixel_frequency",
           "plot_class_deltas", "pool_reliability", "plot_reliability"]

CLASSIFIERS = (("p", "original p"), ("pp", "context-aware p_p"), ("py", "oracle p_y"))
# Fig. 4 draws the oracle in red and the original classifier in blue; p_p gets the third colour.
COLOURS = {"original p": "tab:blue", "context-aware p_p": "tab:green", "oracle p_y": "tab:red"}
IGNORE_INDEX = 255


# -- which runs ------------------------------------------------------------------------------------
def _is_default_cac(row: Row) -> bool:
    from cac.core.classifier import CACOptions

    return row.cac is not None and CACOptions.from_dict(row.cac) == CACOptions()


def full_cac_row(spec: Spec, with_runs: Optional[Iterable[str]] = None) -> Optional[Row]:
    """The row with every CAC option at its default (the method as published); else the first +CAC
    row. Only rows in ``with_runs`` are considered when it is given."""
    allowed = None if with_runs is None else set(with_runs)
    rows = [r for r in spec.rows if r.cac is not None and (allowed is None or r.label in allowed)]
    return next((r for r in rows if _is_default_cac(r)), rows[0] if rows else None)


def pick_seed(*seed_sets: Iterable[int], prefer: int = 0) -> Optional[int]:
    """``prefer`` if every set has it, else the smallest seed all share (None if none)."""
    common = set.intersection(*(set(s) for s in seed_sets)) if seed_sets else set()
    if not common:
        return None
    return prefer if prefer in common else min(common)


# -- Fig. 4: oracle curves -------------------------------------------------------------------------
def metric_history(uri: str, runs: Mapping[int, object]):
    """Long DataFrame ``seed, step, split, classifier, mIoU``: the dense curve series
    ``curve/{train,val}_mIoU_{p,pp,py}`` where a run has it, else ``{train,val}/mIoU_{p,pp,py}``."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient(tracking_uri=uri)
    records = []
    for seed, run in sorted(runs.items()):
        dense = any(k.startswith("curve/") for k in run.data.metrics)
        for split in ("train", "val"):
            for short, name in CLASSIFIERS:
                key = f"curve/{split}_mIoU_{short}" if dense else f"{split}/mIoU_{short}"
                for m in client.get_metric_history(run.info.run_id, key):
                    records.append({"seed": seed, "step": int(m.step), "split": split, "classifier": name,
                                    "mIoU": float(m.value)})
    return pd.DataFrame.from_records(records, columns=["seed", "step", "split", "classifier", "mIoU"])


def save_figure(fig, out_stem: Path) -> list[Path]:
    """Write ``<stem>.png`` (150 dpi) and ``<stem>.pdf``; close the figure."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_oracle_curves(frame, title: str):
    """Train and val panels: mIoU over iterations per classifier, mean over seeds ± 1 sd band."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    n_seeds = frame["seed"].nunique() if len(frame) else 0
    order = [name for _, name in CLASSIFIERS if name in set(frame["classifier"])]
    for ax, split in zip(axes, ("train", "val")):
        part = frame[frame["split"] == split]
        if len(part):
            sns.lineplot(data=part, x="step", y="mIoU", hue="classifier", hue_order=order, palette=COLOURS,
                         errorbar=("sd", 1) if n_seeds > 1 else None, marker="o", ax=ax)
        ax.set_title(f"{split} ({'fixed train subset' if split == 'train' else 'fixed val images'})")
        ax.set_xlabel("iteration")
        ax.set_ylabel("mIoU (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend() is not None and split == "train":
            ax.get_legend().remove()
        elif ax.get_legend() is not None:
            ax.legend(title=None, fontsize=8)
    band = f"mean over {n_seeds} seeds ± 1 sd" if n_seeds > 1 else f"{n_seeds} seed"
    fig.suptitle(f"{title} ({band})", fontsize=10)
    fig.tight_layout()
    return fig


def oracle_curves_figure(spec: Spec, preset: str, uri: str, out_dir: Path,
                         runs: Optional[Mapping[str, Mapping[int, object]]] = None) -> list[Path]:
    """``oracle_curves_<spec>_<preset>.{png,pdf}`` from the full-CAC row's metric history.

    Rows that never log p_y (no oracle branch) are skipped in favour of one that does.
    """
    runs = runs if runs is not None else matched_runs(spec, preset, uri)
    with_runs = [label for label, seeds in runs.items() if seeds]
    candidates = [full_cac_row(spec, with_runs)] + [r for r in spec.rows if r.label in with_runs and r.cac is not None]
    for row in (r for r in candidates if r is not None):
        frame = metric_history(uri, runs[row.label])
        if len(frame) and (frame["classifier"] == "oracle p_y").any():
            title = f"{spec.name} {row.label} {row.description} — preset {preset}"
            fig = plot_oracle_curves(frame, title)
            return save_figure(fig, out_dir / f"oracle_curves_{spec.name}_{preset}")
    return []


# -- a run's model and data ------------------------------------------------------------------------
def _work_root(work_root: Optional[Path]) -> Path:
    import cac.exp.runner

    return Path(work_root) if work_root is not None else Path(cac.exp.runner.WORK_ROOT)


def run_work_dir(run, work_root: Optional[Path] = None) -> Optional[Path]:
    """The run's local work dir ``<root>/<spec>/<preset>/<data version>/<row>-s<seed>-<hash8>`` (or,
    for runs tracked before the data version was part of it, without that level), if it is here."""
    tags = run.data.tags
    base = _work_root(work_root) / tags.get("spec", "") / tags.get("preset", "")
    version = slug(tags["data_version"]) if tags.get("data_version") else ""
    pattern = f"*-s{tags.get('seed')}-{tags.get('config_hash', '')[:8]}"
    for folder in ([base / version] if version else []) + [base]:
        hits = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if hits:
            return hits[0]
    return None


def _artifact_dir(run) -> Path:
    path = Path(tempfile.gettempdir()) / "cac-analysis-artifacts" / run.info.run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_config(uri: str, run, work_root: Optional[Path] = None) -> dict:
    """The resolved config the run trained with, as a plain dict."""
    import mlflow
    from mmengine.config import Config

    local = run_work_dir(run, work_root)
    path = local / "artifacts" / "config.py" if local else None
    if path is None or not path.is_file():
        client = mlflow.MlflowClient(tracking_uri=uri)
        path = Path(client.download_artifacts(run.info.run_id, "config.py", str(_artifact_dir(run))))
    return Config.fromfile(str(path)).to_dict()


def _iter_of(path: Path) -> int:
    try:
        return int(path.stem.split("_")[-1])
    except ValueError:
        return -1


def run_checkpoint(uri: str, run, work_root: Optional[Path] = None) -> Path:
    """The run's final checkpoint: local ``last_checkpoint`` / newest ``iter_N.pth``, else the artifact."""
    import mlflow

    local = run_work_dir(run, work_root)
    if local is not None:
        pointer = local / "last_checkpoint"
        if pointer.is_file() and Path(pointer.read_text().strip()).is_file():
            return Path(pointer.read_text().strip())
        ckpts = sorted(local.glob("iter_*.pth"), key=_iter_of)
        if ckpts:
            return ckpts[-1]
    client = mlflow.MlflowClient(tracking_uri=uri)
    names = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint") if a.path.endswith(".pth")]
    if not names:
        raise FileNotFoundError(f"run {run.info.run_id}: no checkpoint in its work dir or its MLflow artifacts")
    name = max(names, key=lambda n: _iter_of(Path(n)))
    return Path(client.download_artifacts(run.info.run_id, name, str(_artifact_dir(run))))


def load_run_model(uri: str, run, work_root: Optional[Path] = None):
    """``(model in eval mode on the CPU, config dict)`` of a finished run."""
    from mmengine.runner import load_checkpoint

    from cac.mmseg.params import build_model

    cfg = run_config(uri, run, work_root)
    model = build_model(cfg["model"])
    load_checkpoint(model, str(run_checkpoint(uri, run, work_root)), map_location="cpu", logger="silent")
    return model.eval(), cfg


def build_val_dataset(cfg: Mapping):
    """The config's val dataset (mmseg scope; ``import cac`` registers ContextScenesDataset)."""
    import copy

    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    import cac  # noqa: F401

    init_default_scope("mmseg")
    ds_cfg = copy.deepcopy(dict(cfg["val_dataloader"]["dataset"]))
    root = ds_cfg.get("data_root")
    if root and not Path(root).is_dir():
        raise FileNotFoundError(f"the run's val data {root} is not on this machine")
    return DATASETS.build(ds_cfg)


def val_batch(dataset, indices: Sequence[int]) -> dict:
    """An mmengine data batch of the given val items (the config's test pipeline)."""
    from mmengine.dataset import pseudo_collate

    return pseudo_collate([dataset[i] for i in indices])


def evenly_spaced(n_items: int, k: int) -> list[int]:
    """``k`` indices spread over ``range(n_items)``: a fixed choice, not picked by how models do."""
    k = max(1, min(k, n_items))
    return sorted({int(round(i * (n_items - 1) / max(k - 1, 1))) for i in range(k)}) if k > 1 else [0]


def predict_masks(model, batch: dict) -> list[np.ndarray]:
    """The model's test-time class map per image (``model.test_step``: p_p for a +CAC model), in the
    batch's order. Images of different sizes (test pipelines keep each image's aspect) are run as
    :func:`cac.mmseg.evaluation.size_groups`, one ``test_step`` per size, since mmseg's data
    preprocessor stacks a test batch only when its images share one size."""
    import torch

    from cac.mmseg.evaluation import size_groups

    masks: list = [None] * len(batch["inputs"])
    with torch.no_grad():
        for indices, group in size_groups(batch):
            for i, sample in zip(indices, model.test_step(group)):
                masks[i] = sample.pred_sem_seg.data.squeeze(0).cpu().numpy().astype(np.int64)
    return masks


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore: int = IGNORE_INDEX) -> np.ndarray:
    """``H x W`` class ids to ``H x W x 3`` uint8 colours; ignored (and unknown) pixels black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    n = min(len(palette), 256)
    pal[:n] = np.asarray(palette, dtype=np.uint8)[:n]
    ids = np.where((mask >= 0) & (mask < len(palette)) & (mask != ignore), mask, 255).astype(np.int64)
    out = pal[np.clip(ids, 0, 255)]
    out[ids == 255] = 0
    return out


def plot_masks(images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
               rows: Sequence[tuple[str, Sequence[np.ndarray]]], palette: Sequence[Sequence[int]], title: str = ""):
    """Fig. 6 layout: columns are images; rows image, ground truth, then one row per model.

    Pixels ignored in the ground truth are black in every row (they are not scored).
    """
    n_rows, n_cols = 2 + len(rows), len(images)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 1.9 * n_rows), squeeze=False)
    panels = [("image", list(images)), ("ground truth", [colorize(g, palette) for g in gts])]
    for name, preds in rows:
        panels.append((name, [colorize(np.where(g == IGNORE_INDEX, IGNORE_INDEX, p), palette)
                              for p, g in zip(preds, gts)]))
    for r, (name, pics) in enumerate(panels):
        for c, pic in enumerate(pics):
            ax = axes[r][c]
            ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def masks_figure(spec: Spec, preset: str, uri: str, out_dir: Path, n_images: int = 4,
                 runs: Optional[Mapping[str, Mapping[int, object]]] = None,
                 work_root: Optional[Path] = None) -> list[Path]:
    """``masks_<spec>_<preset>.{png,pdf}``: baseline row vs the full-CAC row, seed 0 where both have it."""
    runs = runs if runs is not None else matched_runs(spec, preset, uri)
    if not spec.baseline or not runs.get(spec.baseline):
        return []
    cac_row = full_cac_row(spec, [label for label, seeds in runs.items() if seeds and label != spec.baseline])
    if cac_row is None:
        return []
    seed = pick_seed(runs[spec.baseline], runs[cac_row.label])
    if seed is None:
        return []
    base_model, cfg = load_run_model(uri, runs[spec.baseline][seed], work_root)
    cac_model, _ = load_run_model(uri, runs[cac_row.label][seed], work_root)
    dataset = build_val_dataset(cfg)
    batch = val_batch(dataset, evenly_spaced(len(dataset), n_images))
    gts = [s.gt_sem_seg.data.squeeze(0).numpy().astype(np.int64) for s in batch["data_samples"]]
    images = [_read_rgb(s.img_path) for s in batch["data_samples"]]
    palette = dataset.metainfo.get("palette")
    base_row = spec.row(spec.baseline)
    rows = [(f"baseline {base_row.label}", predict_masks(base_model, batch)),
            (f"+CAC {cac_row.label}", predict_masks(cac_model, batch))]
    title = (f"{spec.name} (preset {preset}, seed {seed}): baseline {base_row.label} {base_row.description} "
             f"vs {cac_row.label} {cac_row.description}")
    return save_figure(plot_masks(images, gts, rows, palette, title), out_dir / f"masks_{spec.name}_{preset}")


# -- where CAC helps per class; calibration ----------------------------------------------------------
def run_artifact_text(uri: str, run, name: str, work_root: Optional[Path] = None) -> Optional[str]:
    """A run's logged artifact ``name`` (the local work dir's ``artifacts/`` copy, else MLflow's), or
    None when the run never logged it (runs from before the artifact existed)."""
    import mlflow

    local = run_work_dir(run, work_root)
    if local is not None and (local / "artifacts" / name).is_file():
        return (local / "artifacts" / name).read_text()
    client = mlflow.MlflowClient(tracking_uri=uri)
    if name not in {a.path for a in client.list_artifacts(run.info.run_id)}:
        return None
    return Path(client.download_artifacts(run.info.run_id, name, str(_artifact_dir(run)))).read_text()


def read_class_table(text: str, column: str) -> dict[str, float]:
    """``{class: value}`` from a per-class CSV (``per_class_iou.csv``: column ``iou``;
    ``per_class_iou_classifiers.csv``: ``iou_p``, ``iou_pp``, ``iou_py``); empty cells are NaN."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and column not in rows[0]:
        raise KeyError(f"no column {column!r} in the per-class table (has {', '.join(rows[0])})")
    return {r["class"]: float(r[column]) if r[column] not in ("", None) else float("nan") for r in rows}


def train_pixel_frequency(cfg: Mapping, limit: int = 2000) -> dict[str, float]:
    """Each class's share (%) of the labelled pixels of the config's train set (up to ``limit``
    evenly spaced images), read from the label maps as the dataset decodes them."""
    import copy

    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    from PIL import Image

    import cac  # noqa: F401

    init_default_scope("mmseg")
    ds_cfg = copy.deepcopy(dict(cfg["train_dataloader"]["dataset"]))
    while "dataset" in ds_cfg and "data_root" not in ds_cfg:  # RepeatDataset and the like
        ds_cfg = dict(ds_cfg["dataset"])
    root = ds_cfg.get("data_root")
    if root and not Path(root).is_dir():
        raise FileNotFoundError(f"the run's train data {root} is not on this machine")
    ds_cfg["pipeline"] = []
    dataset = DATASETS.build(ds_cfg)
    names = list(dataset.metainfo["classes"])
    counts = np.zeros(len(names), dtype=np.int64)
    for i in evenly_spaced(len(dataset), min(limit, len(dataset))):
        info = dataset.get_data_info(i)
        label = np.asarray(Image.open(info["seg_map_path"])).astype(np.int64)
        if info.get("reduce_zero_label"):
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
        label = label[(label >= 0) & (label < len(names))]
        counts += np.bincount(label, minlength=len(names))[: len(names)]
    total = max(int(counts.sum()), 1)
    return {name: 100.0 * int(c) / total for name, c in zip(names, counts)}


def plot_class_deltas(sections: Mapping[str, Sequence], title: str):
    """Δ IoU (points) against the class's share of train pixels (log scale), a panel per comparison,
    with each class's paired 95% CI as a bar (:class:`analysis.tables.ClassDelta` points)."""
    fig, axes = plt.subplots(1, len(sections), figsize=(6.0 * len(sections), 4.2), squeeze=False)
    for ax, (name, deltas) in zip(axes[0], sections.items()):
        pts = [d for d in deltas if d.delta is not None and d.frequency]
        for d in pts:
            ci = d.delta
            err = [[ci.mean - ci.low], [ci.high - ci.mean]] if ci.has_interval else None
            ax.errorbar(d.frequency, ci.mean, yerr=err, fmt="o", ms=4, color="tab:green", ecolor="grey",
                        capsize=2)
            ax.annotate(d.name, (d.frequency, ci.mean), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(0.0, color="black", lw=0.8)
        if pts:
            ax.set_xscale("log")
        ax.set_xlabel("share of train pixels (%)")
        ax.set_ylabel("Δ IoU (points), mean over seeds ± 95% CI")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pool_reliability(tables: Sequence[Sequence[Mapping]]) -> list[dict]:
    """Several runs' reliability bins (``calibration.json``'s ``bins``) pooled pixel-weighted."""
    out = []
    for bins in zip(*tables):
        n = sum(b["pixels"] for b in bins)
        conf = sum(b["pixels"] * (b["confidence"] or 0.0) for b in bins)
        acc = sum(b["pixels"] * (b["accuracy"] or 0.0) for b in bins)
        out.append({"low": bins[0]["low"], "high": bins[0]["high"], "pixels": n,
                    "confidence": conf / n if n else None, "accuracy": acc / n if n else None})
    return out


def plot_reliability(curves: Mapping[str, Sequence[Mapping]], title: str):
    """Reliability diagram: accuracy against mean confidence per bin for each curve, the diagonal
    (perfect calibration), and below it each bin's share of pixels."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    width = 1.0 / max(len(next(iter(curves.values()), [])), 1) / (len(curves) + 1)
    for i, (name, bins) in enumerate(curves.items()):
        used = [b for b in bins if b["pixels"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", ms=3, label=name)
        total = sum(b["pixels"] for b in bins) or 1
        hist.bar([b["low"] + (i + 0.5) * width for b in bins], [100.0 * b["pixels"] / total for b in bins],
                 width=width, label=name)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    hist.set_xlabel("confidence (top softmax probability)")
    hist.set_ylabel("% of pixels")
    hist.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
