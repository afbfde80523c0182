"""The context-aware classifier module and Eq. (8), pure PyTorch."""
import pytest
import torch

from cac.classifier import CACOptions, ContextAwareClassifier, cac_losses
from cac.designs import DESIGNS
from cac.functional import cosine_logits, mask_pool, soft_pool

N, D = 5, 16


def _inputs(b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, D, h, w, generator=g)
    weight = torch.randn(N, D, generator=g)
    bias = torch.randn(N, generator=g)
    labels = torch.randint(0, N, (b, h * 2, w * 2), generator=g)  # labels at a higher resolution
    labels[:, :3] = 255
    return feats, weight, bias, labels


def test_projector_size_matches_paper_d512():
    """§4.1: two linear layers 2d->d/2->d; with d=512 both projectors add 0.79M (Table 1's +0.79M)."""
    cac = ContextAwareClassifier(512, 150)
    n = sum(p.numel() for p in cac.parameters())
    assert n == 2 * (1024 * 256 + 256 + 256 * 512 + 512) == 787_968


def test_default_forward_follows_eqs_4_to_6():
    feats, weight, bias, labels = _inputs()
    cac = ContextAwareClassifier(D, N)
    out = cac(feats, weight, bias, labels)
    p = torch.nn.functional.conv2d(feats, weight[:, :, None, None], bias)
    torch.testing.assert_close(out.p, p)
    a_p = cac.proj_p(torch.cat([soft_pool(feats, p), weight.expand(2, N, D)], -1))
    torch.testing.assert_close(out.p_p, cosine_logits(feats, a_p, 15.0))
    lab = torch.nn.functional.interpolate(labels[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long()
    c_y, _ = mask_pool(feats, lab, N)
    a_y = cac.proj_y(torch.cat([c_y, weight.expand(2, N, D)], -1))
    torch.testing.assert_close(out.p_y, cosine_logits(feats, a_y, 15.0))


def test_predict_returns_context_output_by_default_and_p_on_option():
    feats, weight, bias, _ = _inputs()
    cac = ContextAwareClassifier(D, N)
    torch.testing.assert_close(cac.predict(feats, weight, bias), cac(feats, weight, bias).p_p)
    orig = ContextAwareClassifier(D, N, {"test_output": "original"})
    torch.testing.assert_close(orig.predict(feats, weight, bias), orig(feats, weight, bias).p)


def test_oracle_options_batch_pool_and_absent_fill():
    feats, weight, bias, labels = _inputs()
    labels[0][labels[0] == 3] = 0  # class 3 absent from image 0 only
    base = ContextAwareClassifier(D, N, {"design_y": "proto", "context": "cos"})
    c_img = base.oracle_prototypes(feats, torch.nn.functional.interpolate(
        labels[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long(), weight)
    assert (c_img[0, 3] == 0).all()
    fill = ContextAwareClassifier(D, N, {"oracle_absent": "classifier"})
    lab = torch.nn.functional.interpolate(labels[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long()
    c_fill = fill.oracle_prototypes(feats, lab, weight)
    if not (lab[0] == 3).any():
        torch.testing.assert_close(c_fill[0, 3], weight[3])
    batch = ContextAwareClassifier(D, N, {"oracle_pool": "batch"})
    c_b = batch.oracle_prototypes(feats, lab, weight)
    torch.testing.assert_close(c_b[0], c_b[1])  # one prototype set for the whole batch
    mask = (lab == 1)
    want = feats.permute(0, 2, 3, 1)[mask].mean(0)
    torch.testing.assert_close(c_b[0, 1], want)


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_every_design_forms_a_classifier(name):
    feats, weight, bias, labels = _inputs()
    cac = ContextAwareClassifier(D, N, {"design_y": name, "design_p": name})
    out = cac(feats, weight, bias, labels)
    assert out.p_p.shape == out.p_y.shape == (2, N, 8, 8)
    has_proj = DESIGNS[name].projector_in(D) is not None
    assert (cac.proj_p is not None) == has_proj


def test_design_classifier_uses_original_weights():
    feats, weight, bias, _ = _inputs()
    cac = ContextAwareClassifier(D, N, {"design_p": "classifier"})
    torch.testing.assert_close(cac(feats, weight, bias).p_p, cosine_logits(feats, weight, 15.0))


def test_original_cos_and_context_dot_and_none():
    feats, weight, bias, _ = _inputs()
    cos = ContextAwareClassifier(D, N, {"original": "cos", "context": "none", "tau": 7.0})
    out = cos(feats, weight, bias)
    torch.testing.assert_close(out.p, cosine_logits(feats, weight, 7.0))
    assert out.p_p is None and cos.proj_p is None and cos.proj_y is None
    dot = ContextAwareClassifier(D, N, {"context": "dot"})
    o = dot(feats, weight, bias)
    a_p = dot.proj_p(torch.cat([soft_pool(feats, o.p), weight.expand(2, N, D)], -1))
    torch.testing.assert_close(o.p_p, torch.einsum("bnd,bdhw->bnhw", a_p, feats))


def _ce(logits, labels, accuracy=True):
    lab = torch.nn.functional.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
    out = {"loss_ce": torch.nn.functional.cross_entropy(logits, lab.long(), ignore_index=255)}
    return {**out, "acc_seg": torch.tensor(1.0)} if accuracy else out


def test_eq8_terms_weights_and_skips():
    feats, weight, bias, labels = _inputs()
    opts = CACOptions(lambda_kl=2.0, loss_ce_y=0.0)
    cac = ContextAwareClassifier(D, N, opts)
    out = cac(feats, weight, bias, labels)
    losses = cac_losses(out, labels, opts, ce=lambda x, acc: _ce(x, labels, acc))
    assert set(losses) == {"loss_ce", "acc_seg", "loss_ctx_ce", "loss_kl"}
    torch.testing.assert_close(losses["loss_ctx_ce"], _ce(out.p_p, labels)["loss_ce"])
    none = CACOptions(lambda_kl=0.0, loss_ce_y=0.0)
    out2 = ContextAwareClassifier(D, N, none)(feats, weight, bias, labels)
    assert out2.p_y is None  # the oracle is not even computed when nothing needs it


def test_gradients_reach_projectors_and_not_through_teacher_into_theta_y_when_only_kl():
    feats, weight, bias, labels = _inputs()
    weight.requires_grad_(True)
    opts = CACOptions(loss_ce_y=0.0)  # Table 2 (e): L_y^ce off, KL on -> theta_y gets no gradient
    cac = ContextAwareClassifier(D, N, opts)
    out = cac(feats, weight, bias, labels)
    loss = sum(v for k, v in cac_losses(out, labels, opts, ce=lambda x, acc: _ce(x, labels, acc)).items() if "loss" in k)
    loss.backward()
    assert all(p.grad is None for p in cac.proj_y.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cac.proj_p.parameters())


@pytest.mark.parametrize("bad", [{"tau": 0.0}, {"tau": -1.0}, {"lambda_kl": -0.1}, {"design_p": "nope"},
                                 {"context": "sin"}, {"kl_target_mix": 2.0}, {"nope": 1}])
def test_options_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        CACOptions.from_dict(bad)
