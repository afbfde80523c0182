"""CAC at its cost floor: the fused upsample + CE on every chunking, one product and one norm for p_p
and p_y, no host sync and no logit-sized cast chain in a train step, the precision policy, and a
test-time output equal to the unfused formula. All on CPU; `benchmarks/fused_check.py` runs the same
comparisons on a GPU."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cac.core.functional as fn
from cac.core.classifier import CACOptions, ContextAwareClassifier, cac_losses
from cac.core.functional import conv_precision, cosine_logits, mask_pool, upsampled_cross_entropy

IGN = 255
# ops that make the host wait for the device (CUDA): a value read back, or an output size from data
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::bincount",
            "aten::nonzero", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::masked_select")
COPIES = ("aten::_to_copy", "aten::copy_", "aten::to")


def _devices(value, cpu_scalars: bool) -> set[str]:
    """Device types of the tensors in ``value`` (a tensor, or a list/tuple of them); a 0-dim CPU tensor
    is a wrapped scalar that a kernel reads as a value, not a copy, unless ``cpu_scalars``."""
    if isinstance(value, torch.Tensor):
        return set() if (value.device.type == "cpu" and value.dim() == 0 and not cpu_scalars) else {value.device.type}
    if isinstance(value, (list, tuple)):
        return set().union(*(_devices(v, cpu_scalars) for v in value)) if value else set()
    return set()


class OpLog(TorchDispatchMode):
    """Every ATen op called (forward and backward), with its output's dtype and size, and the ops whose
    tensors live on more than one device (a host <-> device copy: on CUDA, the host waits for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, object]] = []
        self.crossings: list[str] = []
        self.entered: list[str] = []  # also ops that raised (meta tensors have no data to read back)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.entered.append(name)
        kwargs = kwargs or {}
        devices = _devices([*args, *kwargs.values()], cpu_scalars=name in COPIES)
        if kwargs.get("device") is not None:  # a copy's target
            devices.add(torch.device(kwargs["device"]).type)
        if len(devices) > 1:
            self.crossings.append(name)
        out = func(*args, **kwargs)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.calls.append((name, (first.dtype, first.numel()) if first is not None else None,
                           (out.dtype, out.numel()) if isinstance(out, torch.Tensor) else None))
        return out


def _labels(b: int, h: int, w: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n, (b, h, w), generator=g)
    labels[0, : max(1, h // 5)] = IGN
    labels[-1, h // 2:, : w // 3] = IGN
    return labels


# -- the fused upsample + cross-entropy -----------------------------------------------------------------
@pytest.mark.parametrize("chunking", ["rows", "images"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("small_chunks", [True, False])
def test_fused_ce_equals_interpolate_then_ce(monkeypatch, chunking, align_corners, small_chunks):
    """Values and gradients equal ``F.interpolate`` + ``F.cross_entropy`` in float64: odd sizes, ignored
    pixels, ragged last chunk (8-row bands; 2 of 3 images) or one chunk."""
    b, n, size = 3, 7, (23, 17)
    monkeypatch.setattr(fn, "_CHUNK_BYTES", 1 if small_chunks else 1 << 30)
    monkeypatch.setattr(fn, "_ACCEL_CHUNK_MIN", 2 * n * size[0] * size[1] * 8 if small_chunks else 1 << 30)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = _labels(b, *size, n)
    ref = F.cross_entropy(F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners), labels,
                          reduction="none", ignore_index=IGN)
    out = upsampled_cross_entropy(x, labels, align_corners=align_corners, chunking=chunking)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert (out[labels == IGN] == 0).all()
    w = torch.rand(ref.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(out, x, w)[0], torch.autograd.grad(ref, x, w)[0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunking", ["rows", "images"])
def test_fused_ce_saves_no_full_size_tensor_for_backward(chunking):
    """Only low-resolution tensors and per-pixel scalars live until backward; the unfused path keeps a
    full-size [B, N, H, W] log-softmax (so the probe does see such tensors)."""
    b, n, size = 2, 9, (40, 36)
    x = torch.randn(b, n, 10, 9, dtype=torch.float64, requires_grad=True)
    labels = _labels(b, *size, n)
    full = b * n * size[0] * size[1]

    def saved_sizes(loss_fn) -> list[int]:
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss_fn().sum().backward()
        return sizes

    unfused = saved_sizes(lambda: F.cross_entropy(F.interpolate(x, size=size, mode="bilinear"), labels,
                                                  reduction="none", ignore_index=IGN))
    assert max(unfused) >= full
    fused = saved_sizes(lambda: upsampled_cross_entropy(x, labels, chunking=chunking))
    assert max(fused) <= full // 4


def test_fused_ce_lifts_half_precision_and_ignores_autocast():
    x = torch.randn(2, 5, 4, 4)
    labels = _labels(2, 9, 11, 5)
    ref = upsampled_cross_entropy(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsampled_cross_entropy(x.bfloat16(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, upsampled_cross_entropy(x.bfloat16().float(), labels))
    assert (out - ref).abs().max() < 0.1  # only the logits' rounding to bfloat16 differs
    with pytest.raises(ValueError, match="chunking"):
        upsampled_cross_entropy(x, labels, chunking="bands")


# -- the classifier's products ---------------------------------------------------------------------------
def _case(dtype=torch.float64, b=2, d=12, n=5, h=7, w=6, options=None, seed=0):
    torch.manual_seed(seed)
    cac = ContextAwareClassifier(d, n, options).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    feats = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    feats[0, :, 0, 0] = 0  # a zero feature: its cosine logits are 0, not NaN
    weight = torch.randn(n, d, generator=g, dtype=dtype)
    bias = torch.randn(n, generator=g, dtype=dtype)
    return cac, feats, weight, bias, _labels(b, 2 * h, 2 * w, n, seed)


def _separate(cac, feats, weight, bias, labels):
    """p_p and p_y as two separate cosine products, straight from the pieces (today's unfused path)."""
    o = cac.options
    p = feats.flatten(2).transpose(1, 2).matmul(weight.T).transpose(1, 2).reshape(
        feats.shape[0], -1, *feats.shape[2:]) + bias[:, None, None]
    prob = p.flatten(2).softmax(1)
    c_p = prob @ feats.flatten(2).transpose(1, 2) / prob.sum(2, keepdim=True)
    a_p = cac.form(o.design_p, c_p, weight, cac.proj_p)
    small = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
    a_y = cac.form(o.design_y, cac.oracle_prototypes(feats, small, weight), weight, cac.proj_y)
    f_hat = F.normalize(feats, dim=1, eps=1e-6).flatten(2)  # the per-pixel normalised copy of f

    def cos(a):
        return (o.tau * F.normalize(a, dim=-1, eps=1e-6) @ f_hat).reshape(feats.shape[0], -1, *feats.shape[2:])
    return p, cos(a_p), cos(a_y)


@pytest.mark.parametrize("profile", ["paper", "official"])
def test_p_p_and_p_y_from_one_product_equal_separate_products(profile, monkeypatch):
    """One stacked cosine product with one norm of f gives p_p and p_y (values and every gradient) of
    two separate products over a normalised copy of f."""
    cac, feats, weight, bias, labels = _case(options={"profile": profile})
    feats.requires_grad_(True)
    weight.requires_grad_(True)
    norms = []
    real = fn._inv_channel_norm
    monkeypatch.setattr(fn, "_inv_channel_norm", lambda f: norms.append(1) or real(f))
    out = cac(feats, weight, bias, labels=labels)
    assert len(norms) == 1  # one pass for the norm of f, shared by p_p and p_y
    monkeypatch.setattr(fn, "_inv_channel_norm", real)
    ref = _separate(cac, feats, weight, bias, labels)
    params = [feats, weight, *cac.proj_p.parameters(), *cac.proj_y.parameters()]
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        g = torch.randn_like(want)
        for prm, a, b in zip(params, torch.autograd.grad(got, params, g, retain_graph=True, allow_unused=True),
                             torch.autograd.grad(want, params, g, retain_graph=True, allow_unused=True)):
            a, b = (torch.zeros_like(p) if t is None else t for t, p in ((a, prm), (b, prm)))
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)  # ~1e7 at the zero feature


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("grad", [False, True])
def test_predict_equals_the_unfused_formula(dtype, atol, grad):
    """The test-time output (p_p written into p's buffer without autograd) equals Eqs. (4)-(6) computed
    in float64 with a normalised copy of f: to 1e-10 in float64; in float32 to 1e-5, a few float32 ulps
    of logits up to tau = 15 (any order of the same float32 operations differs by that much)."""
    cac, feats, weight, bias, labels = _case(dtype=dtype, d=64, n=19, h=16, w=13)
    cac.eval()
    with torch.set_grad_enabled(grad):
        got = cac.predict(feats, weight, bias)
    with torch.no_grad():
        _, want, _ = _separate(copy.deepcopy(cac).double(), feats.double(), weight.double(), bias.double(), labels)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)
    # and the in-place test-time path equals the autograd path (forward's p_p) to 1e-6 in either dtype
    torch.testing.assert_close(got, cac(feats, weight, bias).p_p.detach(), rtol=0, atol=1e-6)


def test_mask_pool_over_batch_is_the_stacked_batch():
    """``over_batch`` pools every pixel of the batch: the batch laid out as one tall image."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    labels = _labels(3, 5, 6, 7, seed=3)
    labels[labels == 6] = 0  # class 6 absent everywhere
    protos, present = mask_pool(feats, labels, 7, IGN, over_batch=True)
    stacked = feats.transpose(0, 1).reshape(1, 4, 15, 6)
    want, want_present = mask_pool(stacked, labels.reshape(1, 15, 6), 7, IGN)
    assert protos.shape == (3, 7, 4) and torch.equal(present, want_present.expand(3, -1))
    torch.testing.assert_close(protos, want.expand(3, -1, -1))
    assert not present[:, 6].any() and (protos[:, 6] == 0).all()


# -- a whole CAC loss step: no host sync, no logit-sized cast chain ------------------------------------
def _train_step(cac, feats, weight, bias, labels):
    out = cac(feats, weight, bias, labels=labels)

    def ce(logits, accuracy):
        return {"loss_ce": upsampled_cross_entropy(logits, labels).sum() / (labels != IGN).sum().clamp_min(1)}
    losses = cac_losses(out, labels, cac.options, ce=ce)
    sum(losses.values()).backward()
    return out


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("profile", ["paper", "official"])
def test_a_cac_train_step_makes_no_host_sync(profile, device):
    """Forward and backward of every CAC term (oracle pooling, the two cosine classifiers, the KL, the
    fused CE terms) call no op that makes a GPU wait (``.item()``, ``equal``, ``bincount``, ``nonzero``,
    ``unique``, a host <-> device copy). On the meta device CAC takes the paths it takes on CUDA (the
    head's convolution for p, the norm reduction, the fused CE in groups of whole images, the products
    at the convolutions' precision): those are traced too, and seen taken."""
    cac, feats, weight, bias, labels = _case(dtype=torch.float32, options={"profile": profile})
    cac, feats, weight, bias, labels = (t.to(device) for t in (cac, feats, weight, bias, labels))
    feats.requires_grad_(True)
    weight.requires_grad_(True)
    with OpLog() as log:
        _train_step(cac, feats, weight, bias, labels)
    names = {name for name, _, _ in log.calls}
    assert names and not names & set(SYNC_OPS), names & set(SYNC_OPS)
    assert not log.crossings, log.crossings
    gpu_paths = {"aten::convolution", "aten::linalg_vector_norm", "aten::upsample_bilinear2d"}
    assert gpu_paths <= names if device == "meta" else not {"aten::convolution", "aten::upsample_bilinear2d"} & names
    with OpLog() as log:  # the probe sees a sync and a copy where there is one
        for probe in (labels.unique, lambda: feats.detach().to("cpu" if device == "meta" else "meta")):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # meta has nothing to read back
                probe()
    assert {"aten::_unique2"} <= set(log.entered) and log.crossings, (log.entered, log.crossings)


def test_amp_keeps_p_p_and_p_y_in_float32_after_their_product():
    """Under autocast, p_p and p_y leave their (half-precision) product scaled straight into float32, the
    losses' dtype, and the soft masks of Eq. (4) come out of a half-precision softmax: no logit-sized map
    is cast from float32 back down to half precision (the old bmm -> float -> half -> float chain, and
    softmax -> float -> normalised -> half for the soft pooling)."""
    cac, feats, weight, bias, labels = _case(dtype=torch.float32, d=16, n=6, h=8, w=8)
    logit_size = feats.shape[0] * 6 * 8 * 8
    half = feats.bfloat16()  # as the head's convolutions hand f over under autocast
    with OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
        out = cac(half, weight, bias, labels=labels)
    assert out.p_p.dtype == out.p_y.dtype == torch.float32
    downcasts = [(src, dst) for name, src, dst in log.calls
                 if name == "aten::_to_copy" and src and dst and src[0] == torch.float32
                 and dst[0] == torch.bfloat16 and dst[1] >= logit_size]
    assert not downcasts, downcasts  # no [B, N, HW] map (soft masks, products) goes float32 -> bfloat16


# -- the precision policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cudnn_tf32", [True, False])
def test_conv_precision_follows_cudnn_on_cuda_only_and_restores(cudnn_tf32):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = not cudnn_tf32
        with conv_precision("cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 == cudnn_tf32
        assert torch.backends.cuda.matmul.allow_tf32 == (not cudnn_tf32)
        with conv_precision("cpu"):
            assert torch.backends.cuda.matmul.allow_tf32 == (not cudnn_tf32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_conv_precision_bmm_is_bmm_forward_and_backward():
    """The autograd node CUDA float32 products go through: bmm's values and gradients."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(fn._ConvPrecisionBmm.apply, (a, b), atol=1e-8, rtol=1e-6)
    out, ref = fn._ConvPrecisionBmm.apply(a, b), torch.bmm(a, b)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for x, y in zip(torch.autograd.grad(out, (a, b), g), torch.autograd.grad(ref, (a, b), g)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_cosine_logits_dtype_option_keeps_float32_from_half_features():
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 8, 3, 3, generator=g).half()
    weights = torch.randn(4, 8, generator=g)
    out = cosine_logits(feats, weights, 15.0, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cosine_logits(feats.float(), weights, 15.0), rtol=0, atol=2e-2)
    assert cosine_logits(feats, weights, 15.0).dtype == torch.float16


@pytest.fixture()
def benchmarks_path(monkeypatch):
    """``benchmarks/`` importable for this test only (its scripts import each other by name)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))


# -- the official algorithm's peer in the benchmarks ----------------------------------------------------
def test_benchmarks_official_peer_computes_our_official_profile_loss(benchmarks_path):
    """``benchmarks/official_cac.py`` (the official heads' computation, timed beside ours) trains the same
    loss as ``profile: official``: the decode head's total loss and its gradients agree in float64."""
    from official_cac import official_model_cfg

    from cac.mmseg.config import resolve_config
    from cac.mmseg.params import build_model
    from cac.synthetic import seg_batch

    cfg = resolve_config("fcn-slim-r18", "quick", cac={"profile": "official"},
                         overrides={"model.decode_head.head.dropout_ratio": 0.0})
    torch.manual_seed(0)
    ours = build_model(cfg["model"]).double().train()
    peer = build_model(official_model_cfg(cfg["model"])).double().train()
    assert type(peer.decode_head).__name__ == "OfficialCACHead"
    peer.load_state_dict(ours.state_dict())
    data = ours.data_preprocessor(seg_batch(64, 3, 12, per_image=4, block=8), True)
    inputs = data["inputs"].double()
    totals = []
    for model in (ours, peer):
        losses = model.loss(inputs, data["data_samples"])
        totals.append(sum(v for k, v in losses.items() if k.startswith("decode.loss")))
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-9, atol=1e-10)
    params = [p for p in ours.decode_head.parameters() if p.requires_grad]
    peer_params = [p for p in peer.decode_head.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(totals[0], params, allow_unused=True),
                    torch.autograd.grad(totals[1], peer_params, allow_unused=True)):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# -- what the CAC nodes keep for backward ---------------------------------------------------------------
def _storages_saved(fn_, *inputs) -> list[tuple[int, int]]:
    """(storage pointer, numel) of every tensor autograd keeps for the backward of ``fn_(*inputs)``."""
    saved: list[tuple[int, int]] = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn_(*inputs)
    return saved, out


def _naive_soft_pool(feats, logits):
    prob = logits.flatten(2).softmax(1)
    return torch.bmm(prob, feats.flatten(2).transpose(1, 2)) / prob.sum(2, keepdim=True)


def _naive_cosine(feats, weights, tau):
    f = F.normalize(feats.flatten(2), dim=1, eps=1e-6)
    return torch.bmm(F.normalize(weights, dim=-1, eps=1e-6).expand(feats.shape[0], -1, -1) * tau, f)


def _naive_distill(student, teacher, labels, mix):
    log_s = student.log_softmax(1)
    t = teacher.detach().softmax(1)
    per = -(t * log_s).sum(1)
    return (1 - mix) * per - mix * log_s.gather(1, labels.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("node", ["soft_pool", "cosine", "distill"])
def test_cac_nodes_equal_autograd_of_their_formula_and_keep_no_extra_map(node):
    """Eq. (4)'s soft pooling, the cosine classifiers' norm scaling and the distillation's per-pixel CE are
    each one autograd node. In float64 their values and gradients equal plain autograd of the formula to
    1e-12, and the only logit-sized tensors they keep for backward are their inputs and outputs (which
    the losses keep anyway): no softmax, log-softmax or pre-scaling product. The probe does see the
    formula's own saved softmax."""
    g = torch.Generator().manual_seed(3)
    b, d, n, h, w = 2, 6, 5, 7, 9
    feats = torch.randn(b, d, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(b, n, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, n, (b, h, w), generator=g)
    if node == "soft_pool":
        ours, naive, inputs = (lambda f, p: fn.soft_pool(f, p)), _naive_soft_pool, (feats, logits)
    elif node == "cosine":
        weights = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
        ours = lambda f, a: cosine_logits(f, a, 15.0).flatten(2)  # noqa: E731
        naive, inputs = (lambda f, a: _naive_cosine(f, a, 15.0)), (feats, weights)
    else:
        teacher = torch.randn(b, n, h, w, generator=g, dtype=torch.float64)
        ours = lambda s: fn._DistillCE.apply(s, teacher, labels, 0.5, True, 0.0)[0]  # noqa: E731
        naive, inputs = (lambda s: _naive_distill(s, teacher, labels, 0.5)), (logits,)
    saved, out = _storages_saved(ours, *inputs)
    naive_saved, ref = _storages_saved(naive, *inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    weight = torch.rand(ref.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, weight), torch.autograd.grad(ref, inputs, weight)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    logit_size = b * n * h * w
    allowed = {t.untyped_storage().data_ptr() for t in (*inputs, logits, out)}
    if node == "distill":
        allowed.add(teacher.untyped_storage().data_ptr())
    extra = [numel for ptr, numel in saved if numel >= logit_size and ptr not in allowed]
    assert not extra, extra
    assert any(numel >= logit_size and ptr not in allowed for ptr, numel in naive_saved)


def test_float16_soft_pool_keeps_precision_at_2560_inference_size():
    """At 2560² inference the soft masks sum over 640² pixels. Masks normalised before a float16 product
    are ~1e-6, deep in fp16's subnormal range; scaling each class's masks by a power of two keeps them
    normal and the sums below fp16's overflow: < 0.5% (``benchmarks/fp16_pool.py`` prints both errors)."""
    g = torch.Generator().manual_seed(0)
    feats = (torch.randn(1, 8, 640, 640, generator=g) * 2).half()
    logits = (torch.randn(1, 6, 640, 640, generator=g) * 3).half()
    logits[:, 0] += 4  # one class covers most of the image: its mass is ~4e5 pixels
    ref = _naive_soft_pool(feats.double(), logits.double())
    out = fn.soft_pool(feats, logits)
    assert out.dtype == torch.float16
    rel = ((out.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
    assert rel < 5e-3, rel
    prob = logits.float().flatten(2).softmax(1)  # the probe: normalising first loses the precision
    old = torch.bmm((prob / prob.sum(2, keepdim=True)).half(), feats.flatten(2).transpose(1, 2)).double()
    assert ((old - ref).abs() / ref.abs().clamp_min(1e-3)).max().item() > 2 * rel


@pytest.mark.slow  # replays a whole model
def test_gpu_path_train_step_keeps_no_full_size_map_for_backward(benchmarks_path):
    """``benchmarks/memory_model.py`` replays a train step on the meta device, where CAC takes its CUDA
    paths. FCN-MV2 at 256², batch 2: CAC's extra activations at the peak are 12.7 MiB, far below one
    full-size [B, N, H, W] logit map (75 MiB; the code before issue 20 kept 174 MB more than the
    baseline). The bound, 14 MiB, is below what one more feature-sized copy adds: the plain autograd
    cosine classifier (a normalised copy of f kept for backward) measured 16.7 MiB."""
    from memory_model import GIB, predicted_peak

    base, ours = (predicted_peak("fcn-mv2", variant, batch=2, crop=256) for variant in ("baseline", "+CAC"))
    extra = (ours["activations"] - base["activations"]) * GIB
    assert 0 < extra < 14 * 2 ** 20, extra / 2 ** 20
    assert ours["weights+grads+optimizer"] > base["weights+grads+optimizer"]  # the projectors


def test_float16_soft_pool_stays_finite_for_large_features_and_empty_classes():
    """The float16 masks' scaling bounds the product's sums by 2^15 whatever |f| (features of 300 on
    1024-pixel classes overflowed a fixed bound of 256 * |f|), and scales up as well as down, so a class
    whose soft mass is ~0 in fp16 gets finite gradients (grad / mass overflowed fp16 and turned every
    feature gradient into NaN), under AMP's loss scale too. Where fp16 can represent the class's masks at
    all, the gradients agree with float64."""
    feats = torch.full((1, 2, 64, 64), 300.0, dtype=torch.float16)
    out = fn.soft_pool(feats, torch.zeros(1, 4, 64, 64, dtype=torch.float16))
    torch.testing.assert_close(out.float(), torch.full((1, 4, 2), 300.0))
    g = torch.Generator().manual_seed(1)
    for empty_logit, upstream in ((-30.0, 1.0), (-12.0, 8.0)):
        feats = torch.rand(1, 2, 4, 4, generator=g).half().requires_grad_()
        logits = torch.zeros(1, 3, 4, 4, dtype=torch.float16)
        logits[:, 2] = empty_logit
        logits.requires_grad_()
        fn.soft_pool(feats, logits).backward(torch.full((1, 3, 2), upstream, dtype=torch.float16))
        f64, l64 = feats.detach().double().requires_grad_(), logits.detach().double().requires_grad_()
        _naive_soft_pool(f64, l64).backward(torch.full((1, 3, 2), upstream, dtype=torch.float64))
        for got, want in ((feats.grad, f64.grad), (logits.grad, l64.grad)):
            assert torch.isfinite(got).all(), (empty_logit, got)
            if empty_logit > -17:  # the class's masks (~3e-6) are fp16 subnormals, not 0 as at -30
                torch.testing.assert_close(got.double(), want, atol=2e-2 * upstream, rtol=2e-2)


def test_float16_cosine_scaling_backward_is_finite_at_zero_features():
    """A float16 cosine output (Table 4's cosine original classifier under AMP) at an all-zero feature
    pixel: 1/eps overflows fp16, so the gradient of the product is formed in float32 (0 there, not
    inf * 0 = NaN), and every other pixel's gradient is the float64 one to fp16 precision."""
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(1, 4, 2, 2, generator=g).half()
    feats[0, :, 0, 0] = 0
    weights = torch.randn(3, 4, generator=g)
    upstream = torch.randn(1, 3, 2, 2, generator=g)
    upstream[0, :, 0, 0] = 0  # its true gradient (tau * a / eps: 1e7) is not a float16 number
    feats.requires_grad_()
    out = cosine_logits(feats, weights, 10.0)
    assert out.dtype == torch.float16
    out.backward(upstream.half())
    ref = feats.detach().double().requires_grad_()  # Eq. (3) by plain autograd in float64
    a = F.normalize(weights.double(), dim=-1, eps=1e-6)
    (10.0 * torch.einsum("nd,bdhw->bnhw", a, F.normalize(ref, dim=1, eps=1e-6))).backward(upstream.double())
    assert torch.isfinite(feats.grad).all() and torch.equal(feats.grad[0, :, 0, 0], torch.zeros(4, dtype=torch.float16))
    torch.testing.assert_close(feats.grad.double(), ref.grad, rtol=2e-2, atol=2e-2)
    assert feats.grad.abs().amax() > 1  # not a zero gradient
