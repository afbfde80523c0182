"""The benchmarked models: configs, random-init builds, one inference, and the classifier's share."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Optional

from cac.bench.timing import device_sync, time_interleaved
from cac.errors import CacError
from cac.exp.spec import Row, Spec
from cac.synthetic import data_samples, seg_batch

__all__ = ["MODEL_ENV", "BenchSettings", "resolve_device", "bench_settings", "bench_model_name", "bench_model_cfg",
           "baseline_label", "build_eval_model", "inference_fn", "classifier_cost"]

MODEL_ENV = "CAC_BENCH_MODEL"


_DEFAULTS = dict(sizes=[512, 1280, 2560], warmup=3, repeats=10, batch_size=1, device="auto")


@dataclass(frozen=True)
class BenchSettings:
    sizes: tuple[int, ...]
    warmup: int
    repeats: int
    batch_size: int
    device: str  # resolved: "cpu" or "cuda"


def resolve_device(name: str) -> str:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CacError("benchmark.device is cuda but no CUDA device is available (use auto or cpu)")
    return name


def bench_settings(spec: Spec, preset: str) -> BenchSettings:
    """The spec's ``benchmark:`` block with the preset's overrides, over the defaults."""
    from cac.mmseg.presets import get_preset

    get_preset(preset)  # an unknown preset is refused even though it only scales the benchmark
    m = {**_DEFAULTS, **spec.benchmark_for(preset)}
    return BenchSettings(tuple(m["sizes"]), m["warmup"], m["repeats"], m["batch_size"], resolve_device(m["device"]))


def bench_model_name(spec: Spec, row: Row, preset: str) -> str:
    """The row's model (a name or a config file's ``name@hash``), or the one ``CAC_BENCH_MODEL`` names."""
    from cac.mmseg.zoo import resolve_model

    return resolve_model(_bench_model_ref(spec, row, preset)).name


def _bench_model_ref(spec: Spec, row: Row, preset: str) -> str:
    return os.environ.get(MODEL_ENV) or spec.model_for(row, preset)


def bench_model_cfg(spec: Spec, row: Row, preset: str) -> dict:
    """The row's model config: the shipped config (any preset), SyncBN -> BN, no pretrained weights,
    whole-image inference. Presets scale the benchmark, never the model."""
    from cac.mmseg.config import resolve_config
    from cac.mmseg.cfgtree import replace_norm, strip_pretrained

    cfg = resolve_config(_bench_model_ref(spec, row, preset), "paper",
                         cac=row.cac if row.cac is not None else False, classifier=spec.classifier_for(row, "paper"),
                         overrides=spec.overrides_for(row, preset), dataset=spec.dataset)
    model = strip_pretrained(replace_norm(cfg["model"], "SyncBN", "BN"))
    model["test_cfg"] = {**(model.get("test_cfg") or {}), "mode": "whole"}
    return model


def baseline_label(spec: Spec, rows: list[Row]) -> Optional[str]:
    """The row Δ is measured against: the spec's ``baseline``, else the first row without CAC."""
    if spec.baseline in [r.label for r in rows]:
        return spec.baseline
    return next((r.label for r in rows if r.kind == "linear"), None)


def build_eval_model(model_cfg: dict, device: str, seed: int = 0):
    """Random init from ``seed``, on ``device``, in eval mode."""
    import torch

    from cac.mmseg.params import build_model

    torch.manual_seed(seed)
    return build_model(model_cfg).to(device).eval()


def inference_fn(model, size: int, batch_size: int) -> Callable[[], None]:
    """One whole-image inference through ``test_step``. The data samples are fresh each call: the
    results written into them (full-size logits) would otherwise stay alive between calls."""
    import torch

    images = seg_batch(size, batch_size)["inputs"]

    def run() -> None:
        with torch.inference_mode():
            model.test_step(dict(inputs=images, data_samples=data_samples(size, batch_size)))
    return run


def _cac_heads(model) -> list:
    from cac.mmseg.head import CACHead

    return [m for m in model.modules() if isinstance(m, CACHead)]


def classifier_cost(model, size: int, batch_size: int, repeats: int, device: str) -> Optional[dict[str, float]]:
    """Median ms of the head's ``conv_seg`` and of the classifier the head ends with (CAC's, GMMSeg's,
    ProtoSeg's) on the same captured features.

    ``None`` for a model without ``CACHead``. Also checks that CAC's oracle projector never runs.
    """
    import torch

    heads = _cac_heads(model)
    if not heads:
        return None
    head = heads[-1]
    conv, cls = head.head.conv_seg, head.classifier
    captured: list[tuple] = []
    oracle_calls: list[int] = []

    def capture(*args: Any) -> Any:  # CACHead calls classifier.predict directly: no module hook fires
        captured.append(args)
        return type(cls).predict(cls, *args)
    cls.predict = capture
    oracle = getattr(cls, "proj_y", None)  # CAC's training-only branch; the other classifiers have none
    hooks = [oracle.register_forward_hook(lambda *a: oracle_calls.append(1))] if oracle is not None else []
    try:
        inference_fn(model, size, batch_size)()
    finally:
        del cls.predict
        for h in hooks:
            h.remove()
    if oracle_calls:
        raise CacError("the oracle projector theta_y ran at inference; p_y must be a training-only branch")
    feats, weight, bias = captured[-1][:3]

    def run_conv() -> None:
        with torch.inference_mode():
            conv(feats)

    def run_cac() -> None:
        with torch.inference_mode():
            cls.predict(feats, weight, bias)
    times = time_interleaved({"conv_seg": run_conv, "cac": run_cac}, warmup=2, repeats=max(repeats, 10),
                             sync=device_sync(device))
    conv_ms, cac_ms = (statistics.median(times[k]) * 1e3 for k in ("conv_seg", "cac"))
    return {"conv_seg_ms": conv_ms, "cac_classifier_ms": cac_ms, "classifier_extra_ms": cac_ms - conv_ms}
