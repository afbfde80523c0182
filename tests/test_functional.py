"""cac.core.functional against naive per-image / per-class / per-pixel loops written here from the paper."""
import math

import pytest
import torch
import torch.nn.functional as F

from cac.core.functional import cosine_logits, entropy_kl_loss, mask_pool, pixel_entropy, resize_bilinear, soft_pool

IGN = 255


def _data(b=3, d=5, h=6, w=7, n=4, seed=0, ignore_frac=0.2, absent=(2,)):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, n, (b, h, w), generator=g)
    for k in absent:
        labels[labels == k] = 0
    labels[torch.rand(b, h, w, generator=g) < ignore_frac] = IGN
    return feats, labels


def naive_mask_pool(feats, labels, n):
    b, d = feats.shape[:2]
    out = torch.zeros(b, n, d, dtype=feats.dtype)
    present = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        for k in range(n):
            m = labels[i] == k
            if m.sum() > 0:
                out[i, k] = feats[i][:, m].mean(dim=1)
                present[i, k] = True
    return out, present


def naive_soft_pool(feats, logits):
    b, d = feats.shape[:2]
    n = logits.shape[1]
    out = torch.zeros(b, n, d, dtype=feats.dtype)
    for i in range(b):
        prob = logits[i].softmax(dim=0)
        for k in range(n):
            wk = prob[k]
            out[i, k] = (feats[i] * wk).sum(dim=(1, 2)) / wk.sum()
    return out


def naive_cosine(feats, weights, tau):
    b, d, h, w = feats.shape
    n = weights.shape[-2]
    out = torch.zeros(b, n, h, w, dtype=feats.dtype)
    for i in range(b):
        wi = weights if weights.dim() == 2 else weights[i]
        for k in range(n):
            for y in range(h):
                for x in range(w):
                    out[i, k, y, x] = tau * torch.nn.functional.cosine_similarity(feats[i, :, y, x], wi[k], dim=0)
    return out


def literal_kl(student, teacher, labels, *, entropy, classwise, entropy_from=None, mix=0.0, normaliser="batch"):
    """L_KL written out from the paper, one pixel and one class at a time (no code shared with cac).

    ``sigma`` is the softmax over classes. Eq. (7): ``-1/|i| sum_i sum_j sigma(p_y)_ij log
    sigma(p_p)_ij``; Eq. (9): ``H_i = -sum_j sigma(p_y)_ij log sigma(p_y)_ij``; Eq. (10): Eq. (7)
    weighted by ``H_i`` and normalised by ``sum_i H_i``; Eq. (11): Eq. (10) restricted to
    ``M_k = (y == k)`` per class, then averaged over classes. ``entropy=False`` puts ``H_i = 1``.
    ``mix`` replaces the target ``sigma(p_y)`` by ``(1 - mix) sigma(p_y) + mix onehot(y)``. ``H`` and
    the target are constants (from detached logits), so only the student gets a gradient.

    ``normaliser="batch"`` (what ``entropy_kl_loss`` does by default, the official code's): ``i`` runs
    over the valid pixels of the whole batch and Eq. (11) averages over the classes present in the
    batch. ``"literal"``: the equations as printed for each image (``1/n`` over all ``n`` classes, a
    class absent from the image adding 0), then the mean over the images that have valid pixels (the
    equations are 0/0 for an image with none).
    """
    b, n, h, w = student.shape
    if normaliser == "literal":
        labelled = [bi for bi in range(b) if (labels[bi] != IGN).any()]
        if not labelled:
            return student.sum() * 0.0
        return sum(literal_kl(student[bi:bi + 1], teacher[bi:bi + 1], labels[bi:bi + 1], entropy=entropy,
                              classwise=classwise, mix=mix, normaliser="image",
                              entropy_from=None if entropy_from is None else entropy_from[bi:bi + 1])
                   for bi in labelled) / len(labelled)
    pixels = [(bi, y, x) for bi in range(b) for y in range(h) for x in range(w) if int(labels[bi, y, x]) != IGN]
    if not pixels:
        return student.sum() * 0.0
    source = (teacher if entropy_from is None else entropy_from).detach()
    ce = {}  # i -> sum_j target_ij log sigma(p_p)_ij (the sign is applied once, at the end)
    weight = {}  # i -> H_i (Eq. 9), or 1
    for i in pixels:
        bi, y, x = i
        lab = int(labels[bi, y, x])
        sig_y = torch.softmax(teacher[bi, :, y, x].detach(), dim=0)
        log_sig_p = torch.log(torch.softmax(student[bi, :, y, x], dim=0))
        total = 0.0
        for j in range(n):
            target = (1.0 - mix) * sig_y[j] + mix * (1.0 if j == lab else 0.0)
            total = total + target * log_sig_p[j]
        ce[i] = total
        if entropy:
            q = torch.softmax(source[bi, :, y, x], dim=0)
            weight[i] = -sum(q[j] * torch.log(q[j]) for j in range(n))
        else:
            weight[i] = 1.0
    if not classwise:  # Eq. (7) (H_i = 1: the denominator is the number of valid pixels) or Eq. (10)
        return -sum(weight[i] * ce[i] for i in pixels) / sum(weight[i] for i in pixels)
    per_class = []  # Eq. (11), one class at a time
    for k in range(n):
        mask = {i: 1.0 if int(labels[i]) == k else 0.0 for i in pixels}  # M_k^i
        if sum(mask.values()) == 0:
            continue  # class k absent: adds 0 to the sum ("image"), and is not counted ("batch")
        num = sum(mask[i] * weight[i] * ce[i] for i in pixels)
        den = sum(mask[i] * weight[i] for i in pixels)
        per_class.append(num / den)
    return -sum(per_class) / (n if normaliser == "image" else len(per_class))


def test_mask_pool_matches_loop_with_ignored_and_absent():
    feats, labels = _data()
    labels[1] = IGN  # a wholly ignored image
    protos, present = mask_pool(feats, labels, 4, IGN)
    ref, ref_present = naive_mask_pool(feats, labels, 4)
    assert torch.equal(present, ref_present)
    assert not present[1].any() and not present[:, 2].any()
    torch.testing.assert_close(protos, ref)
    assert torch.isfinite(protos).all() and (protos[1] == 0).all()


def test_mask_pool_ignores_out_of_range_labels():
    feats, labels = _data(ignore_frac=0.0)
    labels[0, 0, 0] = 9  # not a class and not ignore_index: must not be pooled anywhere
    protos, _ = mask_pool(feats, labels, 4, IGN)
    labels[0, 0, 0] = IGN
    ref, _ = naive_mask_pool(feats, labels, 4)
    torch.testing.assert_close(protos, ref)


def test_soft_pool_matches_loop():
    feats, _ = _data()
    logits = torch.randn(3, 4, 6, 7, dtype=torch.float64) * 3
    torch.testing.assert_close(soft_pool(feats, logits), naive_soft_pool(feats, logits))


@pytest.mark.parametrize("shared", [True, False])
def test_cosine_logits_matches_loop(shared):
    feats, _ = _data(b=2, h=3, w=4)
    weights = torch.randn(4, 5, dtype=torch.float64) if shared else torch.randn(2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(cosine_logits(feats, weights, 15.0), naive_cosine(feats, weights, 15.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cosine_logits_zero_feature_is_finite(dtype):
    feats = torch.zeros(1, 5, 2, 2, dtype=dtype)
    feats[..., 0, 0] = 0.5  # one non-zero pixel keeps its value
    weights = torch.randn(3, 5).to(dtype)
    out = cosine_logits(feats, weights, 10.0)
    assert out.dtype == dtype and torch.isfinite(out).all() and (out[..., 1:, :] == 0).all()
    torch.testing.assert_close(out[..., 0, 0].float(), naive_cosine(feats.float(), weights.float(), 10.0)[..., 0, 0],
                               rtol=1e-2, atol=2e-2)


def _kl_case(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 student/teacher logits and labels that separate the reductions one could pick: ignored
    pixels, an absent class (2), a class present in one image only (3), images with unequal numbers
    of valid pixels and one wholly ignored image."""
    _, labels = _data(b=3, h=4, w=5, n=5, ignore_frac=0.25, absent=(2, 3))
    labels[0, 0, :3] = 3
    labels[2] = IGN
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, 4, 5, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 5, 4, 5, generator=g, dtype=torch.float64) * 2
    return student, teacher, labels


def _assert_value_and_grad(got: torch.Tensor, want: torch.Tensor, student: torch.Tensor) -> None:
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, student, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("mix", [0.0, 0.3])  # not 0.5: swapping the two parts must show
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("classwise", [False, True])
def test_entropy_kl_loss_is_eqs_7_9_10_11(entropy, classwise, mix):
    """Values and student gradients against the literal Eqs. (7)/(10)/(11), all four variants, with
    the default (batch) normaliser."""
    student, teacher, labels = _kl_case()
    student.requires_grad_(True)
    got = entropy_kl_loss(student, teacher, labels, entropy=entropy, classwise=classwise, ignore_index=IGN,
                          target_mix=mix)
    want = literal_kl(student, teacher, labels, entropy=entropy, classwise=classwise, mix=mix)
    _assert_value_and_grad(got, want, student)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("classwise", [False, True])
def test_entropy_kl_loss_literal_normaliser_is_the_printed_equations(entropy, classwise):
    """normaliser='literal': Eqs. (7)/(10)/(11) as printed, per image, then the mean over images."""
    student, teacher, labels = _kl_case(seed=4)
    student.requires_grad_(True)
    got = entropy_kl_loss(student, teacher, labels, entropy=entropy, classwise=classwise, ignore_index=IGN,
                          target_mix=0.3, normaliser="literal")
    want = literal_kl(student, teacher, labels, entropy=entropy, classwise=classwise, mix=0.3, normaliser="literal")
    _assert_value_and_grad(got, want, student)


@pytest.mark.parametrize("classwise", [False, True])
@pytest.mark.parametrize("source", ["other", "student"])
def test_entropy_kl_loss_entropy_from(classwise, source):
    """Table 3 (1)/(2): H from other logits; from the student itself it is still a constant weight."""
    student, teacher, labels = _kl_case(seed=2)
    student.requires_grad_(True)
    other = torch.randn(student.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    src = other if source == "other" else student
    got = entropy_kl_loss(student, teacher, labels, classwise=classwise, ignore_index=IGN, entropy_from=src)
    want = literal_kl(student, teacher, labels, entropy=True, classwise=classwise, entropy_from=src)
    _assert_value_and_grad(got, want, student)
    # the source really matters: the teacher's entropy gives another value
    assert not torch.allclose(got, literal_kl(student, teacher, labels, entropy=True, classwise=classwise))


def test_eq7_is_plain_mean_of_soft_cross_entropy():
    """With entropy and class-wise off, the loss is exactly Eq. (7) over the valid pixels."""
    student, teacher = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    want = -(teacher.softmax(1) * student.log_softmax(1)).sum(1).mean()
    got = entropy_kl_loss(student, teacher, labels, entropy=False, classwise=False)
    torch.testing.assert_close(got, want)


def test_teacher_gets_no_gradient_student_does():
    _, labels = _data(b=2, h=4, w=5)
    student = torch.randn(2, 4, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 4, 4, 5, requires_grad=True)
    entropy_kl_loss(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_all_ignored_batch_gives_zero_not_nan_and_backprops():
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3)
    labels = torch.full((2, 3, 3), IGN)
    for entropy in (False, True):
        for classwise in (False, True):
            loss = entropy_kl_loss(student, teacher, labels, entropy=entropy, classwise=classwise)
            assert torch.isfinite(loss) and loss.item() == 0.0
            loss.backward()
            assert torch.isfinite(student.grad).all()


def test_one_hot_teacher_zero_entropy_is_finite():
    """A saturated teacher has zero entropy everywhere: Eq. (10)/(11) must not divide by zero. Every
    pixel's weight H_i is 0, so the weighted sums are 0 over a clamped 0 denominator: the loss is 0
    (no pixel teaches anything), in both normalisers and both forms."""
    teacher = torch.full((1, 3, 2, 2), -1e4)
    teacher[:, 0] = 1e4
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    for normaliser in ("batch", "literal"):
        for classwise in (True, False):
            loss = entropy_kl_loss(student, teacher, labels, classwise=classwise, normaliser=normaliser)
            assert loss.item() == 0.0, (normaliser, classwise, loss)
            (grad,) = torch.autograd.grad(loss, student)
            assert torch.equal(grad, torch.zeros_like(grad)), (normaliser, classwise)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_preserves_dtype_and_agrees(dtype):
    feats, labels = _data(d=8, h=16, w=16)
    logits = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    f_lo, l_lo = feats.to(dtype), logits.to(dtype)
    protos, _ = mask_pool(f_lo, labels, 4, IGN)
    sp = soft_pool(f_lo, l_lo)
    cl = cosine_logits(f_lo, torch.randn(4, 8).to(dtype), 15.0)
    kl = entropy_kl_loss(l_lo, l_lo.flip(1), labels)
    for out in (protos, sp, cl, kl):
        assert out.dtype == dtype and torch.isfinite(out).all()
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(protos.double(), naive_mask_pool(f_lo.double(), labels, 4)[0], **tol)
    torch.testing.assert_close(sp.double(), naive_soft_pool(f_lo.double(), l_lo.double()), **tol)
    ref = literal_kl(l_lo.double(), l_lo.flip(1).double(), labels, entropy=True, classwise=True)
    torch.testing.assert_close(kl.double(), ref, **tol)


def test_soft_pool_large_image_no_overflow_in_fp16():
    """Summing soft masks over ~70k pixels overflows float16 unless carried out in float32."""
    feats = torch.ones(1, 4, 256, 280, dtype=torch.float16) * 3
    logits = torch.zeros(1, 2, 256, 280, dtype=torch.float16)
    out = soft_pool(feats, logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.full((1, 2, 4), 3.0))


def test_pixel_entropy_uniform_is_log_n():
    ent = pixel_entropy(torch.zeros(1, 7, 2, 2))
    torch.testing.assert_close(ent, torch.full((1, 2, 2), math.log(7)))


def test_pixel_entropy_is_eq9_per_pixel():
    """Eq. (9) with its sum over classes written out, on peaked and flat pixels alike."""
    logits = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    want = torch.zeros(2, 3, 4, dtype=torch.float64)
    for b in range(2):
        for y in range(3):
            for x in range(4):
                z = [math.exp(v) for v in logits[b, :, y, x].tolist()]
                q = [v / sum(z) for v in z]
                want[b, y, x] = -sum(v * math.log(v) for v in q)
    torch.testing.assert_close(pixel_entropy(logits), want)


@pytest.mark.parametrize("shape,size,align_corners", [
    ((2, 5, 7, 9), (33, 20), False), ((2, 5, 7, 9), (33, 20), True), ((1, 3, 10, 10), (5, 4), False),
    ((2, 4, 1, 1), (4, 4), True), ((1, 2, 6, 6), (6, 6), False)])
def test_resize_bilinear_equals_interpolate_values_and_gradients(shape, size, align_corners):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    out = resize_bilinear(x, size, align_corners=align_corners)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    (g_out,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # 8-row bands with a ragged last one / one band
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsampled_cross_entropy_equals_interpolate_then_ce(monkeypatch, chunk_bytes, align_corners):
    import cac.core.functional as fn

    monkeypatch.setattr(fn, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 23, 17), generator=g)
    labels[0, :3] = 255
    ref = F.cross_entropy(F.interpolate(x, size=(23, 17), mode="bilinear", align_corners=align_corners), labels,
                          reduction="none", ignore_index=255)
    out = fn.upsampled_cross_entropy(x, labels, align_corners=align_corners, ignore_index=255)
    torch.testing.assert_close(out, ref)
    assert (out[0, :3] == 0).all()
    w = torch.rand_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, w)[0], torch.autograd.grad(ref, x, w)[0])
