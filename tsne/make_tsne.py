"""t-SNE of a trained +CAC model (the paper's Fig. 7), plus the Fig. 1 view of one class across images.

    python tsne/make_tsne.py --run-id RUN [--tracking-uri URI] [--images 4] [--out reports/figures]
    python tsne/make_tsne.py --spec table3 [--preset quick]   # the latest FINISHED +CAC run of a spec

Writes ``tsne_<spec>_<preset>_<row>_s<seed>.{png,pdf}`` (the Fig. 7 view; dots: pixel features coloured
by class; large circles: the original classifier C; stars: each image's context-aware classifier A_p),
``..._fig1.{png,pdf}`` (the Fig. 1 view: one class's features, a colour per image; other classes grey)
and ``..._cosine.json``. All three vector kinds are L2-normalised, as the cosine classifier compares
them. The Fig. 7 caption, the printed output and the JSON give the measured mean cosine of each
class's pixels to C[k] and to their own image's A_p[k] (per image, then averaged over images), so the
figure states whether A_p moved toward its image's features, or that it did not.

Fig. 7 has two panels: the raw rows, and their class-specific part (each image's A_p rows and C's
rows minus their mean over the classes present in the image, :func:`tsne.embed.image_rows`). The
JSON's ``views`` gives both views' measures on 16 evenly spaced val images (``--measure-images``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a file: import from the repo root, not this folder
    # (this folder on sys.path would let its modules shadow others, e.g. tables.py vs PyTables)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cac.exp.credentials import public_url  # noqa: E402
from cac.exp.spec import slug  # noqa: E402
from tsne.embed import (VIEWS, ClassCosine, Points, choose_images, cosine_stats, head_view,  # noqa: E402
                        joint_points, mean_cosines, pair_measures, row_similarity, tsne_2d, view_summary)

__all__ = ["pick_run", "make_tsne", "cosine_caption", "cosine_lines", "plot_classifiers", "plot_one_class", "main",
           "view_caption", "view_measures", "plot_views", "VIEW_TITLES"]

IMAGE_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive")


def pick_run(uri: str, spec, preset: str):
    """The latest FINISHED run of the spec's full-CAC row at ``preset``, else of any +CAC row with a
    context-aware classifier; None if there is none. Runs another spec trained with the same identity
    count (they keep their own spec and row in the figure's name)."""
    from cac.core.classifier import CACOptions
    from cac.exp.results import matched_runs

    from analysis.figures import full_cac_row

    ctx_rows = {r.label for r in spec.rows if r.cac is not None and CACOptions.from_dict(r.cac).has_context}
    by_row = {label: list(seeds.values()) for label, seeds in matched_runs(spec, preset, uri).items()
              if label in ctx_rows and seeds}
    if not by_row:
        return None
    full = full_cac_row(spec, set(by_row))
    preferred = by_row.get(full.label) if full is not None else None
    return max(preferred or [r for runs in by_row.values() for r in runs], key=lambda r: r.info.start_time or 0)


def _label_maps(dataset, limit: int = 200) -> list[np.ndarray]:
    from PIL import Image

    n = min(len(dataset), limit)
    return [np.asarray(Image.open(dataset.get_data_info(i)["seg_map_path"])) for i in range(n)]


def _class_colour(palette: Sequence[Sequence[int]], c: int) -> tuple:
    return tuple(np.asarray(palette[c], dtype=float) / 255.0)


def _f(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:+.3f}"


def cosine_caption(stats: Sequence[ClassCosine], rows: Optional[dict] = None) -> str:
    """The measured cosines in a few sentences, ending with what they say about A_p."""
    m = mean_cosines(stats)
    if not stats:
        return "no labelled pixels"
    gain = m["to_ap"] - m["to_c"]
    verdict = ("A_p[k] sits closer to its image's class-k features than C[k] does" if gain > 0.02 else
               "A_p[k] is no closer to its image's class-k features than C[k]" if gain > -0.02 else
               "A_p[k] sits farther from its image's class-k features than C[k] does")
    text = (f"Mean cos of class-k pixels (per image, then over images and {m['classes']} classes) to "
            f"C[k] {_f(m['to_c'])}, to their image's A_p[k] {_f(m['to_ap'])} (Δ {gain:+.3f})")
    if m["to_other_ap"] is not None:
        text += f", to other images' A_p[k] {_f(m['to_other_ap'])}"
    if m["to_c_rest"] is not None:
        text += (f"; to the image's other classes' rows: C {_f(m['to_c_rest'])}, A_p {_f(m['to_ap_rest'])} "
                 f"(margins C {_f(m['to_c'] - m['to_c_rest'])}, A_p {_f(m['to_ap'] - m['to_ap_rest'])})")
    text += "."
    if rows and rows.get("ap") is not None:
        text += (f" An image's A_p rows are alike: mean pairwise cos {_f(rows['ap'])} (the same classes' C rows "
                 f"{_f(rows['c'])}).")
    return f"{text} {verdict}."


def cosine_lines(stats: Sequence[ClassCosine], names: Sequence[str]) -> list[str]:
    """A small fixed-width table, one line per class."""
    width = max([len(names[s.cls]) for s in stats] + [5])
    lines = [f"{'class':<{width}}  images  pixels  C[k]    A_p[k]  other images' A_p[k]  other classes: C  A_p"]
    for s in stats:
        lines.append(f"{names[s.cls]:<{width}}  {s.images:>6}  {s.pixels:>6}  {_f(s.to_c):>6}  {_f(s.to_ap):>6}  "
                     f"{_f(s.to_other_ap):>20}  {_f(s.to_c_rest):>16}  {_f(s.to_ap_rest):>6}")
    return lines


def plot_classifiers(xy: np.ndarray, pts: Points, palette: Sequence[Sequence[int]], names: Sequence[str],
                     title: str, caption: str = "", stats: Sequence[ClassCosine] = (), ax=None, legend: bool = True):
    """Fig. 7: features as dots by class, C as large circles, A_p of each image as stars; ``caption``
    (e.g. the measured cosines) printed under the plot, and each class's ``stats`` in the legend.
    Draws into ``ax`` when given (a panel of :func:`plot_views`)."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.5, 6.5)) if ax is None else (ax.figure, ax)
    colours = np.array([_class_colour(palette, c) for c in pts.cls])
    feat, clf, ctx = (pts.kind == k for k in (Points.FEATURE, Points.CLASSIFIER, Points.CONTEXT))
    ax.scatter(xy[feat, 0], xy[feat, 1], c=colours[feat], s=9, alpha=0.55, linewidths=0)
    ax.scatter(xy[clf, 0], xy[clf, 1], c=colours[clf], s=260, marker="o", edgecolors="black", linewidths=1.5)
    ax.scatter(xy[ctx, 0], xy[ctx, 1], c=colours[ctx], s=300, marker="*", edgecolors="black", linewidths=0.8)
    by_cls = {s.cls: s for s in stats}

    def label(c: int) -> str:
        s = by_cls.get(c)
        return names[c] if s is None else f"{names[c]}: {s.to_c:+.2f} / {s.to_ap:+.2f}"

    handles = [Line2D([], [], marker="o", ls="", color=_class_colour(palette, c), label=label(c))
               for c in sorted(set(pts.cls.tolist()))]
    handles += [Line2D([], [], marker="o", ls="", mfc="white", mec="black", ms=12, label="classifier C"),
                Line2D([], [], marker="*", ls="", mfc="white", mec="black", ms=14, label="context-aware A_p"),
                Line2D([], [], marker=".", ls="", color="grey", label="pixel features")]
    if legend:
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  title="class: mean cos(f, C[k]) / cos(f, A_p[k])" if by_cls else None, title_fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if caption:
        import textwrap

        ax.set_xlabel("\n".join(textwrap.wrap(caption, 110)), fontsize=7, family="monospace", loc="left")
    fig.tight_layout()
    return fig


VIEW_TITLES = {"raw": "raw rows (as the classifiers hold them)",
               "centred": "class-specific part (rows centred over the image's classes present)"}


def view_caption(summary: dict, view: str) -> str:
    """One view's measures (:func:`tsne.embed.view_summary`) in a sentence."""
    if not summary["pairs"]:
        return f"{view}: no image with two or more classes"
    pct = lambda v: "—" if v is None else f"{v:.0f}%"  # noqa: E731
    return (f"{view}, {summary['pairs']} (image, class) pairs in {summary['images']} images: mean cos of class-k "
            f"pixels to C[k] {_f(summary['cos_c'])}, to their image's A_p[k] {_f(summary['cos_ap'])} (A_p closer in "
            f"{pct(summary['ap_closer'])} of pairs); smallest margin to the image's other classes: C "
            f"{_f(summary['margin_c'])}, A_p {_f(summary['margin_ap'])} (A_p larger in "
            f"{pct(summary['ap_margin_larger'])}).")


def plot_views(panels: Sequence[tuple], palette: Sequence[Sequence[int]], names: Sequence[str], title: str,
               stats: Sequence[ClassCosine] = ()):
    """Fig. 7 in its views side by side: ``panels`` of ``(xy, points, panel title, caption)``; the
    class legend (with the raw per-class cosines) once, right of the last panel."""
    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels) + 1.5, 7.0), squeeze=False)
    for i, (ax, (xy, pts, name, caption)) in enumerate(zip(axes[0], panels)):
        plot_classifiers(xy, pts, palette, names, name, caption, stats, ax=ax, legend=i == len(panels) - 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_one_class(xy: np.ndarray, pts: Points, cls: int, name: str, images: Sequence[np.ndarray], title: str):
    """Fig. 1: features of ``cls`` coloured by image (thumbnails framed in the same colour), others grey."""
    k = len(images)
    fig = plt.figure(figsize=(8.5, max(4.0, 1.6 * k)))
    grid = fig.add_gridspec(k, 2, width_ratios=[1, 4])
    feat = pts.kind == Points.FEATURE
    ax = fig.add_subplot(grid[:, 1])
    other = feat & (pts.cls != cls)
    ax.scatter(xy[other, 0], xy[other, 1], c="lightgrey", s=9, linewidths=0, label="other classes")
    for b in range(k):
        sel = feat & (pts.cls == cls) & (pts.image == b)
        ax.scatter(xy[sel, 0], xy[sel, 1], c=IMAGE_COLOURS[b % len(IMAGE_COLOURS)], s=14, linewidths=0,
                   label=f"{name}, image {b + 1}")
        thumb = fig.add_subplot(grid[b, 0])
        thumb.imshow(images[b], interpolation="nearest")
        thumb.set_xticks([])
        thumb.set_yticks([])
        for side in thumb.spines.values():
            side.set_edgecolor(IMAGE_COLOURS[b % len(IMAGE_COLOURS)])
            side.set_linewidth(3)
    ax.legend(fontsize=7, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def view_measures(model, dataset, indices: Sequence[int]) -> dict:
    """Both views' measures (:data:`tsne.embed.VIEWS`) on the val images ``indices``, batched by 8
    (images of any sizes: :func:`tsne.embed.head_view` runs a batch one size at a time)."""
    from analysis.figures import val_batch

    measures: dict[str, list] = {v: [] for v in VIEWS}
    for start in range(0, len(indices), 8):
        view = head_view(model, val_batch(dataset, indices[start:start + 8]))
        for name in VIEWS:
            measures[name] += [replace(m, image=int(indices[start + m.image]))  # the val index, not the batch's
                               for m in pair_measures(view, centred=name == "centred")]
    return {name: {**view_summary(ms), "caption": view_caption(view_summary(ms), name),
                   "pairs_list": [asdict(m) for m in ms]} for name, ms in measures.items()}


def make_tsne(uri: str, run, out_dir: Path, n_images: int = 4, per_class: int = 100, random_state: int = 0,
              work_root: Optional[Path] = None, echo: Callable[[str], None] = print,
              measure_images: int = 16) -> list[Path]:
    """Both t-SNE figures of one finished +CAC run (Fig. 7 in its raw and centred views side by side,
    and the Fig. 1 view) and the cosine sidecar JSON; returns the written files and ``echo``es the
    measured cosines. The views' measures are taken on ``measure_images`` evenly spaced val images."""
    from PIL import Image

    from analysis.figures import build_val_dataset, evenly_spaced, load_run_model, save_figure, val_batch

    model, cfg = load_run_model(uri, run, work_root)
    dataset = build_val_dataset(cfg)
    cls, indices = choose_images(_label_maps(dataset), n_images)
    view = head_view(model, val_batch(dataset, indices))
    stats, rows = cosine_stats(view), row_similarity(view)
    pts = joint_points(view, per_class=per_class, seed=random_state)
    xy = tsne_2d(pts.vectors, random_state=random_state)
    centred_pts = joint_points(view, per_class=per_class, seed=random_state, centred=True)
    measured = evenly_spaced(len(dataset), measure_images)
    views = view_measures(model, dataset, measured)
    names = list(dataset.metainfo["classes"])
    palette = dataset.metainfo["palette"]
    tags = run.data.tags
    spec, row, seed, preset = (tags.get(k, "") for k in ("spec", "row", "seed", "preset"))
    stem = out_dir / f"tsne_{slug(spec or 'run')}_{preset}_{slug(row)}_s{seed}"
    what = f"{spec} {row} seed {seed} (preset {preset}, run {run.info.run_id[:8]}), {len(indices)} val images"
    caption = cosine_caption(stats, rows)
    table = cosine_lines(stats, names)
    echo(f"t-SNE {what}: {caption}")
    for line in table:
        echo(f"  {line}")
    for name in VIEWS:
        echo(f"  {views[name]['caption']}")
    sidecar = stem.with_name(stem.name + "_cosine.json")
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps({
        "run_id": run.info.run_id, "spec": spec, "row": row, "seed": seed, "preset": preset,
        "images": [int(i) for i in indices], "embedded": "L2-normalised f, C rows and A_p rows",
        "what": "mean cosine of class k's pixel features to C[k] (to_c), to their own image's A_p[k] (to_ap), to "
                "the other images' A_p[k] (to_other_ap) and to the rows of the image's other classes (*_rest): "
                "per image over the class's pixels, then averaged over the images with the class",
        "caption": caption, "mean": mean_cosines(stats),
        "row_pairwise_cos": {"what": "mean pairwise cosine of an image's rows (classes present), over images",
                             "ap": rows["ap"], "c": rows["c"]},
        "classes": {names[s.cls]: {"id": s.cls, **{k: v for k, v in asdict(s).items() if k != "cls"}}
                    for s in stats},
        "views": {"what": "per (image, class) pair on all the class's labelled pixels, in the measured images with "
                          "two or more classes: cos_c / cos_ap = mean cosine of the pixel features f to C[k] / to "
                          "the image's A_p[k]; margin_* = that cosine minus the largest cosine to another present "
                          "class's row; ap_closer / ap_margin_larger = % of pairs where A_p's is larger. raw: the "
                          "L2-normalised rows; centred: those rows minus their mean over the image's classes "
                          "present, L2-normalised again",
                  "images": [int(i) for i in measured], **views}},
        indent=1) + "\n")
    centred_xy = tsne_2d(centred_pts.vectors, random_state=random_state)
    panels = [(xy, pts, VIEW_TITLES["raw"], f"{caption} {views['raw']['caption']}"),
              (centred_xy, centred_pts, VIEW_TITLES["centred"], views["centred"]["caption"])]
    paths = save_figure(plot_views(panels, palette, names, f"t-SNE: {what}", stats), stem)
    images = [np.asarray(Image.open(dataset.get_data_info(i)["img_path"]).convert("RGB")) for i in indices]
    paths += save_figure(plot_one_class(xy, pts, cls, names[cls], images,
                                        f"t-SNE of '{names[cls]}' features across images: {what}"),
                         stem.with_name(stem.name + "_fig1"))
    return paths + [sidecar]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a FINISHED +CAC run")
    which.add_argument("--spec", help="a spec stem (table3) or path: use its latest FINISHED +CAC run")
    p.add_argument("--preset", default="quick", help="with --spec (default quick)")
    p.add_argument("--tracking-uri")
    p.add_argument("--images", type=int, default=4, help="val images to embed (default 4)")
    p.add_argument("--per-class", type=int, default=100, help="pixels per class per image (default 100)")
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument("--measure-images", type=int, default=16,
                   help="evenly spaced val images of both views' measures (default 16)")
    p.add_argument("--out", default="reports/figures")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """The command; a bad spec, run id or tracking store is one line on stderr and exit code 2."""
    from cac.errors import CacError

    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except CacError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    import mlflow

    from cac.errors import CacError
    from cac.exp.tracking import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri, create=False)  # reads only: no store is made here
    if args.images < 1 or args.per_class < 1 or args.measure_images < 1:
        raise CacError(f"--images, --per-class and --measure-images must be >= 1, got {args.images}, "
                       f"{args.per_class} and {args.measure_images}")
    if args.run_id:
        try:
            run = mlflow.MlflowClient(tracking_uri=uri).get_run(args.run_id)
        except mlflow.exceptions.MlflowException as err:
            raise CacError(f"run {args.run_id!r} not found in {public_url(uri)} ({str(err).splitlines()[0][:200]})") from None
    else:
        from cac.exp.spec import find_spec, load_spec
        from cac.mmseg.presets import get_preset

        get_preset(args.preset)
        spec = load_spec(find_spec(args.spec))
        run = pick_run(uri, spec, args.preset)
        if run is None:
            print(f"no FINISHED +CAC run of {spec.name} at preset {args.preset} in {public_url(uri)}", file=sys.stderr)
            return 1
    if run.info.status != "FINISHED":
        print(f"run {run.info.run_id} is {run.info.status}, not FINISHED", file=sys.stderr)
        return 1
    for path in make_tsne(uri, run, Path(args.out), args.images, args.per_class, args.random_state,
                          measure_images=args.measure_images):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
