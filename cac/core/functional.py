"""The paper's equations as pure PyTorch functions (no mmseg import).

Shapes follow the paper: features ``f`` are ``[B, D, H, W]``, logits ``[B, N, H, W]``, labels
``[B, H, W]`` with ``ignore_index`` marking unlabelled pixels. Every function is vectorised over
images and classes, never produces NaN for absent classes or fully ignored images, and returns the
dtype it was given (reductions that could overflow in half precision are carried out in float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
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


def _valid_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Bool mask of pixels whose label is a real class (neither ignored nor out of range)."""
    return (labels != ignore_index) & (labels >= 0) & (labels < num_classes)


def mask_pool(
    feats: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Masked average pooling, Eq. (1): ``C_y[b, k] = mean of f[b, :, i] over pixels with y_i = k``.

    Returns ``(protos [B, N, D], present [B, N] bool)``; rows of absent classes are zero.
    Implemented with one ``index_add`` over ``B*N`` bins so no one-hot map is materialised.
    """
    b, d, h, w = feats.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels must be [B,H,W]={(b, h, w)}, got {tuple(labels.shape)}")
    flat = feats.permute(0, 2, 3, 1).reshape(b * h * w, d).to(_acc_dtype(feats.dtype))
    lab = labels.reshape(b, h * w).long()
    valid = _valid_labels(lab, num_classes, ignore_index)
    # Each valid pixel goes to bin (image, class); invalid pixels go to an extra dump bin.
    bins = torch.arange(b, device=feats.device).unsqueeze(1) * num_classes + lab.clamp(0, num_classes - 1)
    dump = b * num_classes
    bins = torch.where(valid, bins, torch.full_like(bins, dump)).reshape(-1)
    sums = flat.new_zeros(dump + 1, d).index_add_(0, bins, flat)[:dump]
    counts = torch.bincount(bins, minlength=dump + 1)[:dump].to(sums.dtype)
    protos = sums / counts.clamp_min(1.0).unsqueeze(1)
    present = (counts > 0).reshape(b, num_classes)
    return protos.reshape(b, num_classes, d).to(feats.dtype), present


def soft_pool(feats: Tensor, logits: Tensor) -> Tensor:
    """Soft prototypes, Eq. (4): ``C_p = softmax(p)^T f / sum_j softmax(p)``, per image.

    ``feats [B, D, H, W]``, ``logits [B, N, H', W']`` (resized to the features if needed).
    Returns ``[B, N, D]``.
    """
    b, d, h, w = feats.shape
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    prob = logits.flatten(2).softmax(dim=1)  # [B, N, HW]
    mass = prob.sum(dim=2, keepdim=True, dtype=_acc_dtype(prob.dtype)).clamp_min(_EPS).to(prob.dtype)
    pixels = feats.flatten(2).transpose(1, 2)  # [B, HW, D], a view
    if prob.element_size() < 4 or feats.element_size() < 4 or _autocast(feats.device.type):
        # The product may run in half precision: normalise the soft masks first, or the sum over
        # pixels overflows fp16.
        return torch.bmm(prob / mass, pixels)
    # Otherwise normalise the small [B, N, D] result, not the [B, N, HW] masks (one pass fewer).
    return torch.bmm(prob, pixels) / mass


def _batched_weights(weights: Tensor, batch: int) -> Tensor:
    if weights.dim() == 2:
        return weights.unsqueeze(0).expand(batch, -1, -1)
    if weights.dim() != 3 or weights.shape[0] != batch:
        raise ValueError(f"weights must be [N,D] or [B={batch},N,D], got {tuple(weights.shape)}")
    return weights


def cosine_logits(feats: Tensor, weights: Tensor, tau: float, out: Tensor | None = None) -> Tensor:
    """Cosine classifier, Eqs. (3) and (6): ``tau * eta(f) @ eta(A)^T``.

    ``weights`` is a shared ``[N, D]`` classifier or one per image ``[B, N, D]``. The feature norm
    is applied after the product, so the normalised feature map is never materialised. ``out``: a
    contiguous ``[B, N, H, W]`` buffer to write the result into (no autograd; ignored under autocast),
    e.g. a dead logit map.
    """
    b, d, h, w = feats.shape
    a = (F.normalize(_batched_weights(weights, b), dim=-1, eps=_EPS) * tau).to(feats.dtype)
    f = feats.flatten(2)  # [B, D, HW]
    inv_norm = _inv_channel_norm(f)
    if f.dtype == torch.float16:  # 1 / eps overflows fp16 (0 * inf at zero features): scale in float32
        return (torch.bmm(a, f).float() * inv_norm).to(f.dtype).reshape(b, -1, h, w)
    inv_norm = inv_norm.to(f.dtype)
    if out is None or _autocast(feats.device.type):  # autocast does not cast out= products
        return (torch.bmm(a, f) * inv_norm).reshape(b, -1, h, w)
    return torch.bmm(a, f, out=out.view(b, -1, h * w)).mul_(inv_norm).view(b, -1, h, w)


def _inv_channel_norm(f: Tensor) -> Tensor:
    """``1 / max(|f_i|, eps)`` over the channels of ``[B, D, L]``, as ``[B, 1, L]`` in float32 or wider."""
    acc = _acc_dtype(f.dtype)
    if f.device.type != "cpu":
        return f.norm(dim=1, keepdim=True, dtype=acc).clamp_min(_EPS).reciprocal()
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

    With ``[N, D]`` weights and a bias it is the head's 1x1 ``conv_seg``, as one batched GEMM: on CPU
    oneDNN's 1x1 convolution is ~20% slower than the GEMM for these shapes (same values up to rounding).
    """
    b, d, h, w = feats.shape
    a = _batched_weights(weights, b).to(feats.dtype)
    f = feats.flatten(2)
    if bias is None:
        return torch.bmm(a, f).reshape(b, -1, h, w)
    return torch.baddbmm(bias.to(feats.dtype).reshape(1, -1, 1), a, f).reshape(b, -1, h, w)


def pixel_entropy(logits: Tensor) -> Tensor:
    """Per-pixel entropy of ``softmax(logits)`` over classes, Eq. (9). ``[B,N,H,W] -> [B,H,W]``."""
    logp = logits.to(_acc_dtype(logits.dtype)).log_softmax(dim=1)
    return -_channel_dot(logp.exp(), logp).squeeze(1)


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
    """
    if normaliser not in ("batch", "literal"):
        raise ValueError(f"normaliser must be 'batch' or 'literal', got {normaliser!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    b, n, h, w = student.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels must be [B,H,W]={(b, h, w)}, got {tuple(labels.shape)}")
    lab = labels.long()
    valid = _valid_labels(lab, n, ignore_index)
    safe_lab = torch.where(valid, lab, torch.zeros_like(lab))

    log_s = student.to(_acc_dtype(student.dtype)).log_softmax(dim=1)
    with torch.no_grad():
        # One log-softmax of the teacher serves both its probabilities and its entropy (Eq. 9).
        log_t = teacher.detach().to(log_s.dtype).log_softmax(dim=1)
        t = log_t.exp()
    per_pixel = -_channel_dot(t, log_s).squeeze(1)  # [B, H, W]
    if target_mix:
        nll = -log_s.gather(1, safe_lab.unsqueeze(1)).squeeze(1)
        per_pixel = (1.0 - target_mix) * per_pixel + target_mix * nll

    if entropy:
        with torch.no_grad():
            if entropy_from is None:
                weight = -_channel_dot(t, log_t).squeeze(1)
            else:
                weight = pixel_entropy(entropy_from.detach())
    else:
        weight = torch.ones_like(per_pixel)
    weight = weight.to(per_pixel.dtype) * valid.to(per_pixel.dtype)
    weighted = weight * per_pixel

    if normaliser == "literal":
        return _per_image_kl(weighted, weight, safe_lab, valid, n, classwise).to(student.dtype)
    if not classwise:
        loss = weighted.sum() / weight.sum().clamp_min(_EPS)
    else:
        num = per_pixel.new_zeros(n).index_add_(0, safe_lab.flatten(), weighted.flatten())
        den = per_pixel.new_zeros(n).index_add_(0, safe_lab.flatten(), weight.flatten())
        present = _present_classes(safe_lab, valid, n)
        per_class = num / den.clamp_min(_EPS)
        loss = (per_class * present).sum() / present.sum().clamp_min(1)
    return loss.to(student.dtype)


def _per_image_kl(weighted: Tensor, weight: Tensor, labels: Tensor, valid: Tensor, n: int,
                  classwise: bool) -> Tensor:
    """Eqs. (7)/(10)/(11) as printed, one image at a time, then the mean over the images that have
    labelled pixels (for an image with none the equations are 0/0). ``weight`` is zero at ignored
    pixels, so they add nothing to a class or an image."""
    b = weighted.shape[0]
    labelled = valid.flatten(1).any(1).to(weighted.dtype)
    if not classwise:
        per_image = weighted.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(_EPS)
    else:
        bins = (torch.arange(b, device=labels.device).view(b, 1) * n + labels.flatten(1)).flatten()
        num = weighted.new_zeros(b * n).index_add_(0, bins, weighted.flatten())
        den = weighted.new_zeros(b * n).index_add_(0, bins, weight.flatten())
        # an absent class has num = den = 0 and adds 0 to the image's sum over all n classes
        per_image = (num / den.clamp_min(_EPS)).view(b, n).sum(1) / n
    return (per_image * labelled).sum() / labelled.sum().clamp_min(1)


def _present_classes(labels: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """Bool ``[N]``: classes with at least one valid pixel, without a host sync."""
    counts = torch.zeros(num_classes, device=labels.device).index_add_(
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


_CHUNK_BYTES = 8 << 20  # full-size rows processed at once: a few MB stays in cache


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Per-pixel CE of bilinearly upsampled logits, computed in bands of output rows.

    Forward and backward upsample one band at a time (rows ``R``, columns ``K``: ``z = R[band] (x K^T)``),
    so the full-size logits, their log-softmax and the NLL's zero-filled full-size gradient are never
    materialised; backward recomputes each band from the low-resolution ``x K^T`` and the per-pixel
    log-partition. Cache-sized bands make the memory-bound passes (log-softmax, exp) ~1.5x faster."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, cols: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0).unsqueeze(1)  # [B, 1, H, W]
        xk = torch.matmul(logits, cols.T)  # [B, N, h, W]
        loss = logits.new_empty(labels.shape)
        log_partition = logits.new_empty(labels.shape)
        band = _band_rows(xk)
        for start in range(0, labels.shape[1], band):
            z = torch.matmul(rows[start:start + band], xk)  # [B, N, band, W]
            log_p = torch.log_softmax(z, dim=1)
            loss[:, start:start + band] = log_p.gather(1, target[:, :, start:start + band]).squeeze(1)
            log_partition[:, start:start + band] = z[:, 0] - log_p[:, 0]  # z_k - log p_k, any k
        loss.neg_().mul_(valid)
        ctx.save_for_backward(xk, rows, cols, log_partition, target, valid)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        xk, rows, cols, log_partition, target, valid = ctx.saved_tensors
        w = (grad * valid).unsqueeze(1)  # [B, 1, H, W]
        grad_xk = torch.zeros_like(xk)
        band = _band_rows(xk)
        for start in range(0, w.shape[2], band):
            r = rows[start:start + band]
            w_band = w[:, :, start:start + band]
            # d loss / d z = (softmax(z) - onehot) * w, built in the recomputed band's buffer
            g = torch.matmul(r, xk).sub_(log_partition[:, None, start:start + band]).exp_().mul_(w_band)
            g.scatter_add_(1, target[:, :, start:start + band], -w_band)
            grad_xk.add_(torch.matmul(r.T, g))
        return torch.matmul(grad_xk, cols), None, None, None, None


def _band_rows(xk: Tensor) -> int:
    """Output rows per band: about ``_CHUNK_BYTES`` of ``[B, N, rows, W]``, at least 8."""
    b, n, _, w = xk.shape
    return max(8, _CHUNK_BYTES // max(1, b * n * w * xk.element_size()))


def upsampled_cross_entropy(logits: Tensor, labels: Tensor, align_corners: bool = False,
                            ignore_index: int = 255) -> Tensor:
    """``F.cross_entropy(resize(logits, labels' size), labels, reduction='none')``: ``[B, H, W]``,
    zero at ignored pixels.

    On CPU (float32/64, no autocast) the upsample and the loss are one autograd node that works in
    bands of output rows and keeps no ``[B, N, H, W]`` tensor: at 32² -> 256² with 150 classes,
    forward + backward took 90-100 ms against 170-180 ms for ``F.interpolate`` + ``F.cross_entropy``.
    """
    size = labels.shape[-2:]
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64) or _autocast("cpu"):
        z = logits if logits.shape[-2:] == size else F.interpolate(logits, size=size, mode="bilinear",
                                                                    align_corners=align_corners)
        return F.cross_entropy(z, labels.long(), reduction="none", ignore_index=ignore_index)
    h, w = logits.shape[-2:]
    rows = _interp_matrix(size[0], h, align_corners, logits.dtype, logits.device)
    cols = _interp_matrix(size[1], w, align_corners, logits.dtype, logits.device)
    return _UpsampledCrossEntropy.apply(logits, rows, cols, labels.long(), ignore_index)
