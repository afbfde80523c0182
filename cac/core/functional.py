"""The paper's equations as pure PyTorch functions (no mmseg import).

Shapes follow the paper: features ``f`` are ``[B, D, H, W]``, logits ``[B, N, H, W]``, labels
``[B, H, W]`` with ``ignore_index`` marking unlabelled pixels. Every function is vectorised over
images and classes, never produces NaN for absent classes or fully ignored images, and returns the
dtype it was given (reductions that could overflow in half precision are carried out in float32).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "autocast_off",
    "conv_precision",
    "policy_bmm",
    "mask_pool",
    "soft_pool",
    "cosine_logits",
    "dot_logits",
    "pixel_entropy",
    "entropy_kl_loss",
    "resize_bilinear",
    "upsampled_cross_entropy",
]

_EPS = 1e-6


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least float32, so half-precision reductions cannot overflow."""
    return torch.promote_types(dtype, torch.float32)


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (products may then run in half precision)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device type autocast does not know (meta: shape-only runs)
        return False


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type``; a no-op where autocast does not exist (meta, shape-only)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _valid_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Bool mask of pixels whose label is a real class (neither ignored nor out of range)."""
    return (labels != ignore_index) & (labels >= 0) & (labels < num_classes)


@contextlib.contextmanager
def conv_precision(device: torch.device | str) -> Iterator[None]:
    """Float32 matrix products inside run at the precision cuDNN uses for convolutions.

    PyTorch's defaults let cuDNN convolutions use TF32 (``torch.backends.cudnn.allow_tf32``) but not
    cuBLAS matmuls (``torch.backends.cuda.matmul.allow_tf32``), so without this CAC's products would run
    in strict fp32 beside a model whose every convolution, ``conv_seg`` included, runs on TF32 tensor
    cores. On CUDA the matmul flag follows cuDNN's for the duration (either way) and is restored after.
    Elsewhere nothing changes, and nothing changes either when the flags were set through PyTorch's
    newer ``fp32_precision`` API (the legacy getters then refuse to answer): the user's choice stands.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        want, old = bool(torch.backends.cudnn.allow_tf32), bool(matmul.allow_tf32)
    except RuntimeError:
        want = old = None
    if want == old:
        yield
        return
    matmul.allow_tf32 = want
    try:
        yield
    finally:
        matmul.allow_tf32 = old


class _ConvPrecisionBmm(torch.autograd.Function):
    """``torch.bmm`` whose forward and backward products both run under :func:`conv_precision`."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        with conv_precision(a.device):
            return torch.bmm(a, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        with conv_precision(grad.device):
            if ctx.needs_input_grad[0]:
                grad_a = torch.bmm(grad, b.transpose(1, 2))
            if ctx.needs_input_grad[1]:
                grad_b = torch.bmm(a.transpose(1, 2), grad)
        return grad_a, grad_b


def policy_bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch.bmm(a, b)`` at the model's own precision (:func:`conv_precision`), backward included.

    CAC's products (soft pooling, Eq. 4; cosine classifiers, Eqs. 3/6) go through here. On CPU, under
    autocast (the product runs in half precision anyway) and for non-float32 inputs it is plain bmm;
    on other devices the products go through :func:`conv_precision` (a no-op but on CUDA).
    ``out`` (no autograd) receives the product.
    """
    if a.device.type == "cpu" or a.dtype != torch.float32 or _autocast(a.device.type):
        return torch.bmm(a, b, out=out)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _ConvPrecisionBmm.apply(a, b)
    with conv_precision(a.device):
        return torch.bmm(a, b, out=out)


def mask_pool(
    feats: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255, over_batch: bool = False
) -> tuple[Tensor, Tensor]:
    """Masked average pooling, Eq. (1): ``C_y[b, k] = mean of f[b, :, i] over pixels with y_i = k``.

    Returns ``(protos [B, N, D], present [B, N] bool)``; rows of absent classes are zero.
    ``over_batch``: the mean runs over the pixels of the whole batch (the official code's C_y), the
    same ``[N, D]`` for every image. One ``scatter_add`` along the pixel axis into ``N + 1`` bins per
    image (the last takes ignored pixels): no one-hot map, no permuted copy of f, and no host sync
    (``bincount`` waits for the GPU to learn its output size).
    """
    b, d, h, w = feats.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels must be [B,H,W]={(b, h, w)}, got {tuple(labels.shape)}")
    acc = _acc_dtype(feats.dtype)
    lab = labels.reshape(b, 1, h * w).long()
    valid = _valid_labels(lab, num_classes, ignore_index)
    bins = torch.where(valid, lab, num_classes)  # [B, 1, HW]
    pixels = feats.flatten(2).to(acc)  # [B, D, HW]: a view unless f is in half precision
    sums = pixels.new_zeros(b, d, num_classes + 1).scatter_add_(2, bins.expand(b, d, h * w), pixels)
    counts = pixels.new_zeros(b, num_classes + 1).scatter_add_(1, bins[:, 0], valid[:, 0].to(acc))
    sums, counts = sums[..., :num_classes], counts[:, :num_classes]
    if over_batch:
        sums, counts = sums.sum(0, keepdim=True).expand(b, -1, -1), counts.sum(0, keepdim=True).expand(b, -1)
    protos = sums.transpose(1, 2) / counts.clamp_min(1.0).unsqueeze(2)
    return protos.to(feats.dtype), counts > 0


# Soft pooling's masks are scaled per class by a power of two s_k with s_k * (mass_k + eps) in (S/2, S],
# in every dtype: the scaled masks sum to about S whatever a class's mass, so Eq. (4) needs no floor on
# the mass (a confident network gives absent classes masses of 1e-9 and below, whose soft mean is still
# the soft mean), backward's grad / (s_k mass_k) cannot blow up, and a power of two changes no rounding.
# float16 (AMP): S = min(_POOL_SCALE, 2^15 / max|f|) per image, so the product's sums stay below 2^15
# (fp16 overflows at 65504; a mass reaches 128² pixels in training, 640² at 2560² inference), and the
# masks are formed in float32 before the one cast, so the scale keeps small-mass classes out of fp16's
# underflow (softmax values below 6e-8 would flush to zero at a logit gap of ~17).
_POOL_SCALE = 256.0
_POOL_SCALE_MAX_LOG2 = 100.0  # s_k <= 2^100: float32 holds s_k and s_k * (softmax entries) exactly


def _pool_masks(logits: Tensor, pixels: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (4)'s soft masks for a product with ``pixels [B,D,L]``: ``(q [B,N,L] in pixels' dtype, scale
    [B,N,1], denom [B,N,1])`` with ``q = scale * softmax(p)`` and ``denom = scale * (mass + eps)``,
    ``mass`` the masks' sum over pixels; ``denom`` is 1 where it is 0 (every mask entry underflowed:
    the class's C_p is then 0, as in the official code). ``eps``: added to the mass (the official
    code's 1e-12); 0 is Eq. (4) as written."""
    dtype, acc = pixels.dtype, _acc_dtype(pixels.dtype)
    if dtype == torch.float16:  # softmax in float32: its entries below 6e-8 would flush to zero in fp16
        q = logits.to(acc).softmax(dim=1)
    else:  # float32/64, and bfloat16 (float32's exponent range): a softmax written in f's dtype, no copy
        q = logits.softmax(dim=1) if logits.dtype == dtype else logits.to(acc).softmax(dim=1).to(dtype)
    mass = q.sum(dim=2, keepdim=True, dtype=acc)
    bound = torch.full_like(mass[:, :1], _POOL_SCALE)
    if dtype == torch.float16:
        peak = pixels.abs().amax(dim=(1, 2), keepdim=True).to(acc)  # [B, 1, 1]
        bound = (2.0 ** 15 / peak).clamp_max(_POOL_SCALE)  # inf at all-zero features: _POOL_SCALE
    need = torch.log2(bound) - torch.log2(mass + eps)  # log2 avoids forming bound / mass (overflow)
    scale = torch.exp2(torch.floor(need).clamp(-_POOL_SCALE_MAX_LOG2, _POOL_SCALE_MAX_LOG2))
    if dtype == torch.float16:  # scaled in float32, then the one cast
        q = q.mul_(scale).to(dtype)
        denom = q.sum(dim=2, keepdim=True, dtype=acc) + scale * eps  # the masks as rounded
    else:  # a power of two changes no rounding: the scaled masks sum to scale * mass
        q = q.mul_(scale.to(dtype))
        denom = scale * (mass + eps)
    return q, scale, torch.where(denom > 0, denom, torch.ones_like(denom))


class _SoftPool(torch.autograd.Function):
    """Eq. (4) as one node that keeps only its inputs (the logits p, in their own dtype, and f) and the
    small result for backward, and recomputes the soft masks there. Autograd would keep the softmax
    and, under AMP, its float32 copy and the normalised masks cast back to half precision."""

    @staticmethod
    def forward(ctx, logits: Tensor, pixels: Tensor, eps: float) -> Tensor:  # [B,N,L], [B,D,L] -> [B,N,D]
        with autocast_off(pixels.device.type):
            q, _, denom = _pool_masks(logits, pixels, eps)
            protos = policy_bmm(q, pixels.transpose(1, 2)).to(denom.dtype) / denom
        ctx.save_for_backward(logits, pixels, protos)
        ctx.eps = eps
        return protos.to(pixels.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        logits, pixels, protos = ctx.saved_tensors
        grad_logits = grad_pixels = None
        with autocast_off(pixels.device.type):
            q, scale, denom = _pool_masks(logits, pixels, ctx.eps)
            g = grad.to(denom.dtype) / denom  # [B, N, D], bounded: denom is about S
            if ctx.needs_input_grad[1]:  # dL/df_i = sum_k q_ik g_k
                grad_pixels = policy_bmm(g.to(pixels.dtype).transpose(1, 2), q)
            if ctx.needs_input_grad[0]:
                # prob_ik dL/dprob_ik = q_ik g_k . (f_i - C_k) =: t_ik (never a huge dL/dprob times a
                # tiny prob), then the softmax's backward: t_ik - prob_ik sum_j t_ij
                t = policy_bmm(g.to(pixels.dtype), pixels).to(denom.dtype)
                t.sub_((g * protos).sum(dim=2, keepdim=True)).mul_(q.to(denom.dtype))
                prob = q.to(denom.dtype).div_(scale)
                grad_logits = t.sub_(prob.mul_(t.sum(dim=1, keepdim=True))).to(logits.dtype)
        return grad_logits, grad_pixels, None


def soft_pool(feats: Tensor, logits: Tensor, eps: float = 0.0) -> Tensor:
    """Soft prototypes, Eq. (4): ``C_p = softmax(p)^T f / sum_j softmax(p)``, per image, at any logit
    gap (no floor on the mass; ``eps`` adds the official code's 1e-12 to it).

    ``feats [B, D, H, W]``, ``logits [B, N, H', W']`` (resized to the features if needed).
    Returns ``[B, N, D]`` in f's dtype. The product runs in f's dtype (under AMP: float16 with the masks
    scaled per class, see ``_POOL_SCALE``), the softmax and the normalisation in float32 or wider.
    """
    b, d, h, w = feats.shape
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return _SoftPool.apply(logits.flatten(2), feats.flatten(2), float(eps))


def _batched_weights(weights: Tensor, batch: int) -> Tensor:
    if weights.dim() == 2:
        return weights.unsqueeze(0).expand(batch, -1, -1)
    if weights.dim() != 3 or weights.shape[0] != batch:
        raise ValueError(f"weights must be [N,D] or [B={batch},N,D], got {tuple(weights.shape)}")
    return weights


def cosine_logits(feats: Tensor, weights: Tensor, tau: float, out: Tensor | None = None,
                  dtype: torch.dtype | None = None) -> Tensor:
    """Cosine classifier, Eqs. (3) and (6): ``tau * eta(f) @ eta(A)^T``.

    ``weights`` is a shared ``[N, D]`` classifier or one per image ``[B, N, D]``; stacking several
    classifiers along N (p_p's and p_y's) computes them in one product with one norm of f. The feature
    norm is applied after the product, so no normalised copy of f is made. ``out``: a contiguous
    ``[B, N, H, W]`` buffer to write the result into (no autograd; ignored under autocast), e.g. a dead
    logit map. ``dtype``: the result's (default f's); a half-precision product is scaled by the norm in
    float32 and cast at most once.
    """
    b, d, h, w = feats.shape
    a = (F.normalize(_batched_weights(weights, b), dim=-1, eps=_EPS) * tau).to(feats.dtype)
    f = feats.flatten(2)  # [B, D, HW]
    inv_norm = _inv_channel_norm(f)  # [B, 1, HW], float32 or wider
    dtype = dtype or feats.dtype
    if out is not None and dtype == f.dtype == inv_norm.dtype and not _autocast(feats.device.type):
        return policy_bmm(a, f, out=out.view(b, -1, h * w)).mul_(inv_norm).view(b, -1, h, w)
    prod = policy_bmm(a, f)
    if torch.is_grad_enabled() and (prod.requires_grad or inv_norm.requires_grad):
        return _NormScale.apply(prod, inv_norm, dtype).reshape(b, -1, h, w)
    return _norm_scale(prod, inv_norm, dtype).reshape(b, -1, h, w)


def _norm_scale(prod: Tensor, inv_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """``prod * inv_norm`` as ``dtype``; a float16 product is scaled in float32 (1 / eps overflows fp16:
    0 * inf at zero features)."""
    if prod.dtype == torch.float16 or prod.dtype != dtype:
        return (prod * inv_norm).to(dtype)
    return prod * inv_norm.to(prod.dtype)


class _NormScale(torch.autograd.Function):
    """:func:`_norm_scale` keeping its output (which the losses keep anyway) instead of the product for
    backward: ``d/d inv_i = sum_k g_k prod_k = sum_k g_k out_k / inv_i``. Saves one ``[B, N, H, W]`` map
    (two with p_p and p_y stacked) per step."""

    @staticmethod
    def forward(ctx, prod: Tensor, inv_norm: Tensor, dtype: torch.dtype) -> Tensor:
        out = _norm_scale(prod, inv_norm, dtype)
        ctx.save_for_backward(out, inv_norm)
        ctx.prod_dtype = prod.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        out, inv_norm = ctx.saved_tensors
        grad_prod = grad_inv = None
        if ctx.needs_input_grad[0]:
            grad_prod = (grad * inv_norm).to(ctx.prod_dtype)  # in float32 or wider: 1/eps overflows fp16
        if ctx.needs_input_grad[1]:
            grad_inv = _channel_dot(grad, out, dtype=inv_norm.dtype) / inv_norm
        return grad_prod, grad_inv, None


def _inv_channel_norm(f: Tensor) -> Tensor:
    """``1 / max(|f_i|, eps)`` over the channels of ``[B, D, L]``, as ``[B, 1, L]`` in float32 or wider:
    one pass over f (GPU reductions accumulate half precision in float32 without a copy)."""
    acc = _acc_dtype(f.dtype)
    if f.device.type != "cpu":
        return torch.linalg.vector_norm(f, dim=1, keepdim=True).to(acc).clamp_min(_EPS).reciprocal()
    # rsqrt(max(|f|^2, eps^2)) is 1 / max(|f|, eps), with a zero (not NaN) gradient at f = 0.
    return _channel_dot(f, f, dtype=acc).clamp_min(_EPS * _EPS).rsqrt()


def _channel_dot(x: Tensor, y: Tensor, dtype: torch.dtype | None = None, block: int = 16) -> Tensor:
    """``sum_k x[:, k] * y[:, k]`` over dim 1, kept as a size-1 dim, computed in ``dtype``.

    On CPU a reduction over the strided channel axis, or the full-size product it reduces, costs as
    much as a classifier-sized matrix product (a 512-channel norm at 128x128: 25 ms, as long as the
    cosine classifier's product). Accumulating channel blocks into one block-sized buffer and reducing
    that once is ~15x faster, in few enough ops to stay fast when other jobs share the cores.
    GPUs reduce over the channel axis well as is.
    """
    dtype = dtype or torch.promote_types(x.dtype, y.dtype)
    if x.device.type != "cpu":
        return (x.to(dtype) * y.to(dtype)).sum(dim=1, keepdim=True)
    block = min(block, x.shape[1])
    acc = x.new_zeros((x.shape[0], block, *x.shape[2:]), dtype=dtype)
    tail = None
    # split, not slicing: autograd then assembles the blocks' gradients in one full-size tensor.
    for xb, yb in zip(x.split(block, dim=1), y.split(block, dim=1)):
        if xb.shape[1] == block:
            acc.addcmul_(xb.to(dtype), yb.to(dtype))
        else:
            tail = (xb.to(dtype) * yb.to(dtype)).sum(dim=1, keepdim=True)
    out = acc.sum(dim=1, keepdim=True)
    return out if tail is None else out + tail


def dot_logits(feats: Tensor, weights: Tensor, bias: Tensor | None = None) -> Tensor:
    """Plain dot-product classifier ``f @ A^T (+ b)`` for shared or per-image weights (Table 4, "Dot").

    With ``[N, D]`` weights and a bias it is the head's 1x1 ``conv_seg``: on CPU as one batched GEMM
    (oneDNN's 1x1 convolution is ~20% slower for these shapes; same values up to rounding), on other
    devices as that very convolution.
    """
    b, d, h, w = feats.shape
    if weights.dim() == 2 and feats.device.type != "cpu":
        # The baseline's conv_seg exactly: cuDNN, at the precision it uses for every other convolution.
        return F.conv2d(feats, weights.to(feats.dtype)[:, :, None, None],
                        None if bias is None else bias.to(feats.dtype))
    a = _batched_weights(weights, b).to(feats.dtype)
    f = feats.flatten(2)
    if bias is None:
        return policy_bmm(a, f).reshape(b, -1, h, w)
    return torch.baddbmm(bias.to(feats.dtype).reshape(1, -1, 1), a, f).reshape(b, -1, h, w)


def pixel_entropy(logits: Tensor, eps: float = 0.0) -> Tensor:
    """Per-pixel entropy of ``softmax(logits)`` over classes, Eq. (9). ``[B,N,H,W] -> [B,H,W]``.
    ``eps``: the official code's ``log(softmax + eps)`` instead of the exact log-softmax."""
    logp = logits.to(_acc_dtype(logits.dtype)).log_softmax(dim=1)
    return _entropy(logp.exp(), logp, eps)


def _entropy(prob: Tensor, logp: Tensor, eps: float) -> Tensor:
    """``-sum_j prob_j log(prob_j)`` over dim 1 (``log(prob_j + eps)`` when ``eps``), as ``[B,H,W]``."""
    return -_channel_dot(prob, logp if not eps else (prob + eps).log()).squeeze(1)


def _normaliser(den: Tensor, eps: float) -> Tensor:
    """A sum of weights as a divisor: ``den + eps``; 1 where that is 0 (nothing was weighed: 0/1 = 0)."""
    den = den + eps if eps else den
    return torch.where(den > 0, den, torch.ones_like(den))


def entropy_kl_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    entropy: bool = True,
    classwise: bool = True,
    ignore_index: int = 255,
    entropy_from: Tensor | None = None,
    target_mix: float = 0.0,
    normaliser: str = "batch",
    eps: float = 0.0,
    boundary: Tensor | None = None,
) -> Tensor:
    """Distillation loss from the oracle ``teacher`` (p_y) to the ``student`` (p_p).

    Cross-entropy form ``l_i = -sum_j softmax(teacher)_ij log softmax(student)_ij`` per pixel, then

    - ``entropy=False, classwise=False``: Eq. (7), the mean of ``l_i`` over valid pixels;
    - ``entropy=True,  classwise=False``: Eq. (10), weighted by the teacher's entropy ``H_i`` (Eq. 9);
    - ``entropy=False, classwise=True``: per class ``k`` the mean over pixels with ``y_i = k``,
      averaged over the classes present in ``labels``;
    - ``entropy=True,  classwise=True``: Eq. (11).

    ``normaliser``: ``"batch"`` (the official code's): sums run over all valid pixels of the batch,
    and the class-wise form averages over the classes present in the batch. ``"literal"``: the
    equations as printed, per image (Eqs. 7/10: the image's mean; Eq. 11: ``1/n`` over all ``n``
    classes, an absent class adding 0), then the mean over the images with labelled pixels. With 8 of
    150 classes present the literal Eq. 11 is ~19x smaller, which acts like a smaller ``lambda_KL``.
    Ignored pixels never count.

    The teacher (and the entropy weights) get no gradient. ``entropy_from`` takes the entropy from
    other logits (Table 3 rows (1)/(2): p_p or p). ``target_mix`` mixes the target with the one-hot
    label, as the official code does (0.5). Labels must be at the logits' resolution.

    ``eps``: 0 is the equations as written, at any confidence (a confident teacher has entropies of
    1e-10 and below; their ratios still weigh the pixels); the official code's 1e-12 goes inside the
    entropy's log and onto each normaliser. Only an all-zero normaliser (no weight at all) is guarded.

    ``boundary`` (bool ``[B, H, W]``, class-wise batch form only): SSA-Seg's split, a class's loss is
    the mean of its boundary pixels' weighted average and its interior pixels' (a part without pixels
    adds 0 to that mean).
    """
    if normaliser not in ("batch", "literal"):
        raise ValueError(f"normaliser must be 'batch' or 'literal', got {normaliser!r}")
    if boundary is not None and not (classwise and normaliser == "batch"):
        raise ValueError("boundary splits the class-wise, batch-normalised form only")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    b, n, h, w = student.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels must be [B,H,W]={(b, h, w)}, got {tuple(labels.shape)}")
    lab = labels.long()
    valid = _valid_labels(lab, n, ignore_index)
    safe_lab = torch.where(valid, lab, torch.zeros_like(lab))

    acc = _acc_dtype(student.dtype)
    want_entropy = entropy and entropy_from is None
    per_pixel, weight = _DistillCE.apply(student.to(acc), teacher.detach().to(acc), safe_lab, float(target_mix),
                                         want_entropy, float(eps))
    if entropy and not want_entropy:
        with torch.no_grad():
            weight = pixel_entropy(entropy_from.detach(), eps)
    elif not entropy:
        weight = torch.ones_like(per_pixel)
    weight = weight.to(per_pixel.dtype) * valid.to(per_pixel.dtype)
    weighted = weight * per_pixel

    if normaliser == "literal":
        return _per_image_kl(weighted, weight, safe_lab, valid, n, classwise, eps).to(student.dtype)
    if not classwise:
        loss = weighted.sum() / _normaliser(weight.sum(), eps)
    else:
        parts = 1 if boundary is None else 2
        bins = safe_lab.flatten() if boundary is None else safe_lab.flatten() * 2 + boundary.flatten().long()
        num = per_pixel.new_zeros(n * parts).index_add_(0, bins, weighted.flatten())
        den = per_pixel.new_zeros(n * parts).index_add_(0, bins, weight.flatten())
        present = _present_classes(safe_lab, valid, n)
        per_class = (num / _normaliser(den, eps)).view(n, parts).mean(dim=1)
        loss = (per_class * present).sum() / present.sum().clamp_min(1)
    return loss.to(student.dtype)


class _DistillCE(torch.autograd.Function):
    """Per pixel ``l_i = -sum_j t_ij log softmax(s)_ij`` with the target ``t = (1 - m) softmax(teacher)
    + m onehot(label)``, and the teacher's entropy (Eq. 9) from the same log-softmax (or None).

    For backward it keeps the student's and teacher's logits, which their CE terms keep anyway, not
    ``log softmax(s)`` and ``softmax(teacher)`` (two more logit-sized maps): ``dl_i/ds_i = softmax(s_i)
    - t_i`` is recomputed from them."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, labels: Tensor, mix: float, entropy: bool, eps: float):
        log_s = student.log_softmax(dim=1)
        log_t = teacher.log_softmax(dim=1)
        t = log_t.exp()
        per_pixel = _channel_dot(t, log_s).squeeze(1).neg_()
        if mix:
            nll = log_s.gather(1, labels.unsqueeze(1)).squeeze(1).neg_()
            per_pixel = per_pixel.mul_(1.0 - mix).add_(nll, alpha=mix)
        weight = _entropy(t, log_t, eps) if entropy else None
        ctx.save_for_backward(student, teacher, labels)
        ctx.mix = mix
        if weight is not None:
            ctx.mark_non_differentiable(weight)
        return per_pixel, weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _grad_weight):
        student, teacher, labels = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = student.softmax(dim=1).sub_(teacher.softmax(dim=1).mul_(1.0 - ctx.mix))
            if ctx.mix:
                index = labels.unsqueeze(1)
                grad_student.scatter_add_(1, index, grad_student.new_full(index.shape, -ctx.mix))
            grad_student.mul_(grad.unsqueeze(1))
        return grad_student, None, None, None, None, None


def _per_image_kl(weighted: Tensor, weight: Tensor, labels: Tensor, valid: Tensor, n: int,
                  classwise: bool, eps: float = 0.0) -> Tensor:
    """Eqs. (7)/(10)/(11) as printed, one image at a time, then the mean over the images that have
    labelled pixels (for an image with none the equations are 0/0). ``weight`` is zero at ignored
    pixels, so they add nothing to a class or an image."""
    b = weighted.shape[0]
    labelled = valid.flatten(1).any(1).to(weighted.dtype)
    if not classwise:
        per_image = weighted.flatten(1).sum(1) / _normaliser(weight.flatten(1).sum(1), eps)
    else:
        bins = (torch.arange(b, device=labels.device).view(b, 1) * n + labels.flatten(1)).flatten()
        num = weighted.new_zeros(b * n).index_add_(0, bins, weighted.flatten())
        den = weighted.new_zeros(b * n).index_add_(0, bins, weight.flatten())
        # an absent class has num = den = 0 and adds 0 to the image's sum over all n classes
        per_image = (num / _normaliser(den, eps)).view(b, n).sum(1) / n
    return (per_image * labelled).sum() / labelled.sum().clamp_min(1)


def _present_classes(labels: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """Bool ``[N]``: classes with at least one valid pixel, without a host sync."""
    counts = torch.zeros(num_classes, device=labels.device, dtype=torch.float32).index_add_(
        0, labels.flatten(), valid.flatten().float()
    )
    return counts > 0


def _interp_matrix(out_size: int, in_size: int, align_corners: bool, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """``[out, in]`` weights of 1-D linear interpolation, with F.interpolate's source coordinates."""
    dst = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else torch.zeros_like(dst)
    else:
        src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(device=device, dtype=dtype)


def resize_bilinear(x: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of ``[B, C, h, w]`` to ``size``, equal to ``F.interpolate(mode='bilinear')``.

    Every loss term upsamples its logits to the label size, and CAC has three such terms, so this is
    on the training hot path. On CPU it is two small matrix products (bilinear interpolation is
    separable), whose backward is also a matrix product: forward + backward measured 3.3x faster than
    ATen's upsample at 16² -> 64² (18 classes, batch 8) and 1.3x at 32² -> 256² (150 classes).
    Elsewhere, and under autocast, it is ``F.interpolate``.
    """
    h, w = x.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or _autocast("cpu"):
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=align_corners)
    rows = _interp_matrix(out_h, h, align_corners, x.dtype, x.device)
    cols = _interp_matrix(out_w, w, align_corners, x.dtype, x.device)
    return torch.matmul(torch.matmul(rows, x), cols.T)


_CHUNK_BYTES = 8 << 20  # CPU: full-size rows processed at once: a few MB stays in cache
# Elsewhere: full-size logits per chunk, 1/1024 of the device's memory within [min, max] (a 512² image
# of 150 classes is 150 MiB). The chunk's tensors are transient at the step's memory peak: keep them small.
_ACCEL_CHUNK_MIN, _ACCEL_CHUNK_MAX, _ACCEL_CHUNK_SHARE = 64 << 20, 256 << 20, 1024


def _chunks(low: Tensor, size: tuple[int, int], bands: bool) -> list[tuple[slice, ...]]:
    """Index tuples into ``[B, H, W]`` per-pixel maps: bands of output rows of about ``_CHUNK_BYTES``
    of ``[B, N, rows, W]`` (at least 8 rows), or groups of whole images sized for the device."""
    b, n = low.shape[:2]
    if bands:
        band = max(8, _CHUNK_BYTES // max(1, b * n * size[1] * low.element_size()))
        return [(slice(None), slice(start, start + band)) for start in range(0, size[0], band)]
    budget = _ACCEL_CHUNK_MIN
    if low.device.type == "cuda":
        share = torch.cuda.get_device_properties(low.device).total_memory // _ACCEL_CHUNK_SHARE
        budget = min(max(budget, share), _ACCEL_CHUNK_MAX)
    per_image = max(1, budget // max(1, n * size[0] * size[1] * low.element_size()))
    return [(slice(start, start + per_image),) for start in range(0, b, per_image)]


def _upsample_chunk(low: Tensor, rows: Tensor | None, chunk: tuple[slice, ...], size: tuple[int, int],
                    align_corners: bool) -> Tensor:
    """The chunk's full-size logits: ``R[band] (x K^T)`` for a band of rows, ``F.interpolate`` of images."""
    if rows is not None:
        return torch.matmul(rows[chunk[1]], low)
    return F.interpolate(low[chunk], size=size, mode="bilinear", align_corners=align_corners)


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Per-pixel CE of bilinearly upsampled logits, computed chunk by chunk.

    Forward and backward upsample one chunk at a time, so the full-size logits, their log-softmax and
    the NLL's zero-filled full-size gradient are never materialised; only low-resolution tensors and
    per-pixel scalars (the log-partition, the target) are kept, and backward recomputes each chunk.
    On CPU a chunk is a band of output rows (rows ``R``, columns ``K``: ``z = R[band] (x K^T)``;
    cache-sized bands make the memory-bound passes ~1.5x faster); elsewhere it is a group of whole
    images through ``F.interpolate``, whose adjoint is ATen's upsample backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, align_corners: bool, ignore_index: int, bands: bool) -> Tensor:
        size = tuple(labels.shape[-2:])
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)
        rows = cols = None
        low = logits
        if bands:
            h, w = logits.shape[-2:]
            rows = _interp_matrix(size[0], h, align_corners, logits.dtype, logits.device)
            cols = _interp_matrix(size[1], w, align_corners, logits.dtype, logits.device)
            low = torch.matmul(logits, cols.T)  # x K^T: [B, N, h, W]
        loss = logits.new_empty(labels.shape)
        log_partition = logits.new_empty(labels.shape)
        for chunk in _chunks(low, size, bands):
            z = _upsample_chunk(low, rows, chunk, size, align_corners)
            log_p = torch.log_softmax(z, dim=1)
            loss[chunk] = log_p.gather(1, target[chunk].unsqueeze(1)).squeeze(1)
            log_partition[chunk] = z[:, 0] - log_p[:, 0]  # z_k - log p_k, any k
        loss.neg_().mul_(valid)
        ctx.save_for_backward(low, rows, cols, log_partition, target, valid)
        ctx.bands, ctx.align_corners, ctx.size = bands, align_corners, size
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        low, rows, cols, log_partition, target, valid = ctx.saved_tensors
        w = grad * valid
        grad_low = torch.zeros_like(low)
        with autocast_off(low.device.type):
            for chunk in _chunks(low, ctx.size, ctx.bands):
                w_c = w[chunk].unsqueeze(1)
                # d loss / d z = (softmax(z) - onehot) * w, built in the recomputed chunk's buffer
                g = _upsample_chunk(low, rows, chunk, ctx.size, ctx.align_corners)
                g.sub_(log_partition[chunk].unsqueeze(1)).exp_().mul_(w_c)
                g.scatter_add_(1, target[chunk].unsqueeze(1), -w_c)
                if ctx.bands:
                    grad_low.add_(torch.matmul(rows[chunk[1]].T, g))
                else:
                    grad_low[chunk] = torch.ops.aten.upsample_bilinear2d_backward(
                        g, list(ctx.size), list(low[chunk].shape), ctx.align_corners)
            grad_logits = torch.matmul(grad_low, cols) if ctx.bands else grad_low
        return grad_logits, None, None, None, None


def upsampled_cross_entropy(logits: Tensor, labels: Tensor, align_corners: bool = False,
                            ignore_index: int = 255, chunking: str | None = None) -> Tensor:
    """``F.cross_entropy(resize(logits, labels' size), labels, reduction='none')``: ``[B, H, W]``,
    zero at ignored pixels, on any device.

    The upsample and the loss are one autograd node that works in chunks and keeps no ``[B, N, H, W]``
    tensor for backward (``F.interpolate`` + ``F.cross_entropy`` keep a full-size log-softmax: 2.4 GiB
    at batch 16, 150 classes, 512²). ``chunking``: ``"rows"`` (bands of output rows as matrix products,
    the CPU default: at 32² -> 256² with 150 classes forward + backward took 90-100 ms against 170-180
    ms unfused) or ``"images"`` (``F.interpolate`` on groups of images sized for the device, the
    default elsewhere). Half-precision logits are lifted to float32 (the loss is computed without
    autocast); the result has the lifted dtype.
    """
    if chunking not in (None, "rows", "images"):
        raise ValueError(f"chunking must be None, 'rows' or 'images', got {chunking!r}")
    size = labels.shape[-2:]
    logits = logits.to(_acc_dtype(logits.dtype))
    with autocast_off(logits.device.type):
        if logits.shape[-2:] == size:  # nothing to upsample: the logits are full-size already
            return F.cross_entropy(logits, labels.long(), reduction="none", ignore_index=ignore_index)
        bands = (chunking or ("rows" if logits.device.type == "cpu" else "images")) == "rows"
        return _UpsampledCrossEntropy.apply(logits, labels.long(), align_corners, ignore_index, bands)
