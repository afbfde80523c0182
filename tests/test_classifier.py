"""The context-aware classifier module and Eq. (8), pure PyTorch."""
import pytest
import torch

from typing import Callable, Optional

from torch import Tensor

from cac.core.classifier import CACOptions, ContextAwareClassifier, cac_losses
from cac.core.designs import DESIGNS, Projector
from cac.core.functional import entropy_kl_loss

N, D = 5, 16
TAU = 15.0


def _inputs(b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, D, h, w, generator=g)
    weight = torch.randn(N, D, generator=g)
    bias = torch.randn(N, generator=g)
    labels = torch.randint(0, N, (b, h * 2, w * 2), generator=g)  # labels at a higher resolution
    labels[:, :3] = 255
    return feats, weight, bias, labels


# ---- the paper's equations written out here (einsum and explicit norms, nothing from cac.core.functional)

def lit_original(feats: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """p = f C^T + b."""
    p = torch.einsum("bdhw,nd->bnhw", feats, weight)
    return p if bias is None else p + bias[None, :, None, None]


def lit_soft_protos(feats: Tensor, p: Tensor) -> Tensor:
    """Eq. (4): C_p = softmax(p)^T f / sum_j softmax(p), softmax over the classes."""
    s = torch.exp(p) / torch.exp(p).sum(dim=1, keepdim=True)
    return torch.einsum("bnhw,bdhw->bnd", s, feats) / s.sum(dim=(2, 3))[..., None]


def lit_oracle_protos(feats: Tensor, labels: Tensor) -> Tensor:
    """Eq. (1): C_y = y_* f / sum_j y_*, y_* the one-hot labels (ignored pixels in no class)."""
    onehot = torch.stack([(labels == k) for k in range(N)], dim=1).to(feats.dtype)
    return torch.einsum("bnhw,bdhw->bnd", onehot, feats) / onehot.sum(dim=(2, 3)).clamp_min(1)[..., None]


def lit_theta(proj: torch.nn.Module, x: Tensor) -> Tensor:
    """theta: Linear -> ReLU -> Linear (paper §4.1), applied with the module's own parameters."""
    first, _, second = proj
    hidden = x @ first.weight.detach().T
    if first.bias is not None:  # the official code's first layer has none (projector_first_bias=False)
        hidden = hidden + first.bias.detach()
    return torch.relu(hidden) @ second.weight.detach().T + second.bias.detach()


def lit_cos(feats: Tensor, a: Tensor, tau: float = TAU) -> Tensor:
    """Eqs. (3)/(6): tau * eta(f) eta(A)^T, per image."""
    f = feats / feats.norm(dim=1, keepdim=True)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero row (absent class under "proto") scores 0
    return tau * torch.einsum("bdhw,bnd->bnhw", f, a)


def lit_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour subsampling of an integer-factor larger label map (pixel (i, j) <- (i*s, j*s))."""
    sy, sx = labels.shape[1] // size[0], labels.shape[2] // size[1]
    return labels[:, ::sy, ::sx]


# Table 5: name -> (theta's input width in units of d, or None; A from (C_*, C, theta)).
TABLE5: dict[str, tuple[Optional[int], Callable[[Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor]]] = {
    "proto": (None, lambda cs, c, th: cs),  # (a) A = C_*
    "proto_plus_cls": (None, lambda cs, c, th: cs + c),  # (b) A = C_* + C
    "proj_proto": (1, lambda cs, c, th: th(cs)),  # (c) A = theta(C_*)
    "proj_sum": (1, lambda cs, c, th: th(cs + c)),  # (d) A = theta(C_* + C)
    "proj_concat": (2, lambda cs, c, th: th(torch.cat([cs, c.expand_as(cs)], -1))),  # (#) Eqs. 2/5
    "proj_concat_residual": (2, lambda cs, c, th: th(torch.cat([cs, c.expand_as(cs)], -1)) + c),  # (e)
    "classifier": (None, lambda cs, c, th: c.expand_as(cs)),  # (h)/(i) A = C
}


def lit_context(cac: ContextAwareClassifier, feats: Tensor, weight: Tensor, bias: Tensor,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(p, p_p, p_y) of Fig. 5 from the equations above, for the cosine context classifier."""
    o = cac.options
    p = lit_original(feats, weight, bias)
    c = weight[None]
    th_p = (lambda x: lit_theta(cac.proj_p, x)) if cac.proj_p is not None else None
    p_p = lit_cos(feats, TABLE5[o.design_p][1](lit_soft_protos(feats, p), c, th_p), o.tau)
    if labels is None:
        return p, p_p, None
    th_y = (lambda x: lit_theta(cac.proj_y, x)) if cac.proj_y is not None else None
    c_y = lit_oracle_protos(feats, lit_nearest(labels, feats.shape[-2:]))
    return p, p_p, lit_cos(feats, TABLE5[o.design_y][1](c_y, c, th_y), o.tau)


def test_projector_size_matches_paper_d512():
    """§4.1: two linear layers 2d->d/2->d; with d=512 both projectors add 0.79M (Table 1's +0.79M)."""
    cac = ContextAwareClassifier(512, 150)
    n = sum(p.numel() for p in cac.parameters())
    assert n == 2 * (1024 * 256 + 256 + 256 * 512 + 512) == 787_968


def test_default_forward_follows_eqs_1_to_6():
    feats, weight, bias, labels = (t.double() if t.is_floating_point() else t for t in _inputs())
    cac = ContextAwareClassifier(D, N).double()
    out = cac(feats, weight, bias, labels)
    p, p_p, p_y = lit_context(cac, feats, weight, bias, labels)
    torch.testing.assert_close(out.p, p)
    torch.testing.assert_close(out.p_p, p_p)
    torch.testing.assert_close(out.p_y, p_y)


@pytest.mark.parametrize("grad", [False, True])
def test_predict_is_eq6_and_p_on_option(grad):
    """predict() against Eqs. (4)-(6) written out; under no_grad it takes its own path (p_p written
    into p's buffer), with autograd it goes through forward(). test_output='original' gives p."""
    feats, weight, bias = (t.double() for t in _inputs()[:3])
    cac = ContextAwareClassifier(D, N).double()
    orig = ContextAwareClassifier(D, N, {"test_output": "original"}).double()
    p, p_p, _ = lit_context(cac, feats, weight, bias)
    assert not torch.allclose(p, p_p)  # so the two checks below cannot pass with the same output
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(cac.predict(feats, weight, bias), p_p)
        torch.testing.assert_close(orig.predict(feats, weight, bias), p)


def test_oracle_options_batch_pool_and_absent_fill():
    feats, weight, bias, labels = _inputs()
    labels[0][labels[0] == 3] = 0  # class 3 absent from image 0 only
    lab = lit_nearest(labels, (8, 8))
    assert not (lab[0] == 3).any() and (lab[1] == 3).any()
    img = ContextAwareClassifier(D, N).oracle_prototypes(feats, lab, weight)
    torch.testing.assert_close(img, lit_oracle_protos(feats, lab))  # Eq. (1) per image
    assert (img[0, 3] == 0).all()  # absent: a zero row
    fill = ContextAwareClassifier(D, N, {"oracle_absent": "classifier"}).oracle_prototypes(feats, lab, weight)
    want = lit_oracle_protos(feats, lab)
    want[0, 3] = weight[3]  # official code: absent rows from C
    torch.testing.assert_close(fill, want)
    batch = ContextAwareClassifier(D, N, {"oracle_pool": "batch"}).oracle_prototypes(feats, lab, weight)
    pixels = feats.permute(0, 2, 3, 1)  # [B, h, w, D]
    want = torch.stack([pixels[lab == k].mean(0) for k in range(N)])  # one set over the whole batch
    torch.testing.assert_close(batch, want.expand(2, N, D))


def test_table5_designs_are_all_known():
    """Every registered design must have its formula in TABLE5 (so it is checked below)."""
    assert set(DESIGNS) == set(TABLE5)


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_design_form_is_its_table5_formula(name):
    """A = design(C_*, C, theta) against Table 5's formula, with a known theta, and theta's widths."""
    width, formula = TABLE5[name]
    design = DESIGNS[name]
    in_dim = design.projector_in(D)
    assert in_dim == (None if width is None else width * D)
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    cls = torch.randn(1, N, D, generator=g, dtype=torch.float64)  # C, broadcast over the images
    proj = None
    if in_dim is not None:
        torch.manual_seed(0)
        proj = Projector(in_dim, D).double()
    got = design.form(protos, cls, proj)
    want = formula(protos, cls, None if proj is None else (lambda x: lit_theta(proj, x)))
    torch.testing.assert_close(got, want)
    # the classifier builds each branch's theta as in §4.1: in -> d/2 -> d
    cac = ContextAwareClassifier(D, N, {"design_y": name, "design_p": name})
    for branch in (cac.proj_p, cac.proj_y):
        if in_dim is None:
            assert branch is None
        else:
            shapes = [tuple(t.shape) for t in branch.parameters()]
            assert shapes == [(D // 2, in_dim), (D // 2,), (D, D // 2), (D,)]


@pytest.mark.parametrize("design_y,design_p", [(n, n) for n in sorted(TABLE5)] + [
    ("proto", "proj_concat"), ("proj_concat", "proto"),  # Table 5 (f), (g)
    ("classifier", "proj_concat"), ("proj_concat", "classifier")])  # Table 5 (h), (i)
def test_every_design_in_forward(design_y, design_p):
    """p_y uses design_y with theta_y on C_y, p_p uses design_p with theta_p on C_p."""
    feats, weight, bias, labels = (t.double() if t.is_floating_point() else t for t in _inputs())
    cac = ContextAwareClassifier(D, N, {"design_y": design_y, "design_p": design_p}).double()
    out = cac(feats, weight, bias, labels)
    _, p_p, p_y = lit_context(cac, feats, weight, bias, labels)
    torch.testing.assert_close(out.p_p, p_p)
    torch.testing.assert_close(out.p_y, p_y)


def test_original_cos_and_context_dot_and_none():
    feats, weight, bias, _ = (t.double() for t in _inputs())
    cos = ContextAwareClassifier(D, N, {"original": "cos", "context": "none", "tau": 7.0}).double()
    out = cos(feats, weight, bias)
    torch.testing.assert_close(out.p, lit_cos(feats, weight.expand(2, N, D), 7.0))
    assert out.p_p is None and cos.proj_p is None and cos.proj_y is None
    dot = ContextAwareClassifier(D, N, {"context": "dot"}).double()
    o = dot(feats, weight, bias)
    p = lit_original(feats, weight, bias)
    a_p = lit_theta(dot.proj_p, torch.cat([lit_soft_protos(feats, p), weight.expand(2, N, D)], -1))
    torch.testing.assert_close(o.p_p, torch.einsum("bnd,bdhw->bnhw", a_p, feats))  # f A_p^T, no tau


def _ce(logits, labels, accuracy=True):
    lab = torch.nn.functional.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
    out = {"loss_ce": torch.nn.functional.cross_entropy(logits, lab.long(), ignore_index=255)}
    return {**out, "acc_seg": torch.tensor(1.0)} if accuracy else out


def _losses(out, labels, **options) -> dict[str, Tensor]:
    return cac_losses(out, labels, CACOptions(**options), ce=lambda x, acc: _ce(x, labels, acc))


def _outputs():
    feats, weight, bias, labels = _inputs()
    return ContextAwareClassifier(D, N)(feats, weight, bias, labels), labels


def test_eq8_unit_weights_give_the_plain_terms():
    out, labels = _outputs()
    base = _losses(out, labels)
    assert set(base) == {"loss_ce", "acc_seg", "loss_ctx_ce", "loss_oracle_ce", "loss_kl"}
    torch.testing.assert_close(base["loss_ce"], _ce(out.p, labels)["loss_ce"])
    torch.testing.assert_close(base["loss_ctx_ce"], _ce(out.p_p, labels)["loss_ce"])
    torch.testing.assert_close(base["loss_oracle_ce"], _ce(out.p_y, labels)["loss_ce"])
    # student p_p, teacher p_y, labels at the logits' size (entropy_kl_loss itself: test_functional.py)
    torch.testing.assert_close(base["loss_kl"], entropy_kl_loss(out.p_p, out.p_y, lit_nearest(labels, (8, 8))))
    assert not torch.allclose(base["loss_kl"], entropy_kl_loss(out.p_y, out.p_p, lit_nearest(labels, (8, 8))))


@pytest.mark.parametrize("key,term", [("lambda_kl", "loss_kl"), ("loss_ce", "loss_ce"),
                                      ("loss_ce_p", "loss_ctx_ce"), ("loss_ce_y", "loss_oracle_ce")])
def test_eq8_each_weight_scales_its_term_linearly_and_zero_removes_it(key, term):
    out, labels = _outputs()
    base = _losses(out, labels)
    for scale in (0.25, 3.0):
        got = _losses(out, labels, **{key: scale})
        assert set(got) == set(base)
        torch.testing.assert_close(got[term], scale * base[term], rtol=1e-6, atol=0)
        for k in base.keys() - {term}:  # the other terms do not move
            assert torch.equal(got[k], base[k]), k
    zero = _losses(out, labels, **{key: 0.0})
    # p's CE is the one asked for acc_seg, so acc_seg goes with it (see cac_losses)
    assert base.keys() - zero.keys() == ({term, "acc_seg"} if term == "loss_ce" else {term})
    for k in zero:
        assert torch.equal(zero[k], base[k]), k


@pytest.mark.parametrize("source", ["oracle", "estimated", "original"])
def test_kl_term_gets_its_options(source):
    """Table 3 (1)/(2): the entropy source, and the KL switches, reach entropy_kl_loss."""
    out, labels = _outputs()
    got = _losses(out, labels, kl_entropy_source=source, kl_classwise=False, kl_target_mix=0.5)["loss_kl"]
    ent = {"oracle": out.p_y, "estimated": out.p_p, "original": out.p}[source]
    lab = lit_nearest(labels, (8, 8))
    torch.testing.assert_close(got, entropy_kl_loss(out.p_p, out.p_y, lab, classwise=False, target_mix=0.5,
                                                    entropy_from=ent))
    others = [entropy_kl_loss(out.p_p, out.p_y, lab, classwise=False, target_mix=0.5, entropy_from=o)
              for o in (out.p_y, out.p_p, out.p) if o is not ent]
    assert all(not torch.allclose(got, o) for o in others)  # the three sources give three values


def test_eq8_oracle_skipped_when_nothing_needs_it():
    feats, weight, bias, labels = _inputs()
    opts = CACOptions(lambda_kl=0.0, loss_ce_y=0.0)
    out = ContextAwareClassifier(D, N, opts)(feats, weight, bias, labels)
    assert out.p_y is None  # the oracle is not even computed when nothing needs it
    assert set(_losses(out, labels, lambda_kl=0.0, loss_ce_y=0.0)) == {"loss_ce", "acc_seg", "loss_ctx_ce"}


def test_gradients_reach_theta_p_and_none_flow_into_the_kl_teacher():
    """Table 2 (e): with L_y^ce off, the distillation's teacher p_y is detached, so nothing trains
    theta_y; checked on p_y itself (theta_y's parameters may not even require a gradient)."""
    feats, weight, bias, labels = _inputs()
    weight.requires_grad_(True)
    opts = CACOptions(loss_ce_y=0.0)
    cac = ContextAwareClassifier(D, N, opts)
    out = cac(feats, weight, bias, labels)
    assert out.p_y.requires_grad  # through C, so the check below could see a gradient
    loss = sum(v for k, v in cac_losses(out, labels, opts, ce=lambda x, acc: _ce(x, labels, acc)).items()
               if k.startswith("loss"))
    (g_y,) = torch.autograd.grad(loss, out.p_y, retain_graph=True, allow_unused=True)
    assert g_y is None or not g_y.any()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cac.proj_p.parameters())


@pytest.mark.parametrize("bad, message", [
    ({"tau": 0.0}, r"cac\.tau must be > 0, got 0\.0"), ({"tau": -1.0}, r"cac\.tau must be > 0, got -1\.0"),
    ({"lambda_kl": -0.1}, r"cac\.lambda_kl must be >= 0, got -0\.1"),
    ({"design_p": "nope"}, r"cac\.design_p must be one of .*got 'nope'"),
    ({"context": "sin"}, r"cac\.context must be one of .*got 'sin'"),
    ({"kl_target_mix": 2.0}, r"cac\.kl_target_mix must be in \[0, 1\], got 2\.0"),
    ({"nope": 1}, r"unknown cac option\(s\) \['nope'\]")])
def test_options_refuse_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        CACOptions.from_dict(bad)
