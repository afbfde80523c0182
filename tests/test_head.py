"""CACHead wraps real mmseg decode heads (FCN, DeepLabV3+, OCR in a cascade, UperNet) on CPU."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cac.mmseg.config import add_cac
from cac.mmseg.head import CACHead, is_plain_cross_entropy
from cac.mmseg.params import build_model
from cac.mmseg.cfgtree import replace_norm, set_num_classes, strip_pretrained
from cac.mmseg.zoo import get_model, load_base_config
from cac.synthetic import seg_batch

NUM_CLASSES = 6
SIZE = 64


def _cpu_model_cfg(name: str, cac=True) -> dict:
    cfg = load_base_config(get_model(name)).to_dict()
    model = strip_pretrained(replace_norm(copy.deepcopy(cfg["model"]), "SyncBN", "BN"))
    set_num_classes(model, NUM_CLASSES)
    model["data_preprocessor"].pop("size", None)
    return add_cac(model, {} if cac is True else cac) if cac else model


def _batch(b=2, seed=0):
    """Float images ``[B, 3, S, S]`` (as after the data preprocessor) and samples with scene-like labels."""
    data = seg_batch(SIZE, b, NUM_CLASSES, per_image=4, block=8, seed=seed)
    return torch.stack(data["inputs"]).float() / 64.0 - 2.0, data["data_samples"]


def _final_head(model):
    head = model.decode_head
    return head[-1] if isinstance(head, torch.nn.ModuleList) else head


@pytest.mark.parametrize("name", ["fcn-mv2", "deeplabv3plus-mv2", "ocrnet-hr18", "upernet-swin-t"])
def test_train_and_predict_step_with_cac(name):
    torch.manual_seed(0)
    model = build_model(_cpu_model_cfg(name))
    head = _final_head(model)
    assert isinstance(head, CACHead)
    model.train()
    inputs, samples = _batch()
    losses = model.loss(inputs, samples)
    final = "decode_1." if name.startswith("ocrnet") else "decode."  # cascade stages are numbered
    keys = {k[len(final):] for k in losses if k.startswith(final)}
    assert {"loss_ce", "loss_ctx_ce", "loss_oracle_ce", "loss_kl"} <= keys
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    for proj in (head.classifier.proj_p, head.classifier.proj_y):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in proj.parameters())
    assert head.head.conv_seg.weight.grad is not None

    model.eval()
    with torch.no_grad():
        preds = model.predict(inputs, samples)
    assert len(preds) == 2
    # The test-time output is the context-aware prediction p_p = tau * cos(f, A_p) (Eq. 6), from the
    # head's features f and each image's A_p, resized bilinearly to the input as mmseg's resize does.
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        args = (feats,) if not isinstance(model.decode_head, torch.nn.ModuleList) else \
            (feats, model.decode_head[0].forward(feats))
        f = head.features(*args)
        a_p = head.context_weights(*args)  # [B, N, D]
        p_p = head.options.tau * torch.einsum("bdhw,bnd->bnhw", F.normalize(f, dim=1), F.normalize(a_p, dim=-1))
        expected = F.interpolate(p_p, size=(SIZE, SIZE), mode="bilinear", align_corners=head.align_corners)
    for i, pred in enumerate(preds):
        torch.testing.assert_close(pred.seg_logits.data, expected[i], rtol=1e-4, atol=1e-4)
        assert torch.equal(pred.pred_sem_seg.data[0], pred.seg_logits.data.argmax(0))


def test_head_type_form_merges_like_base_config_inheritance():
    """`dict(type='CACHead', head_type='FCNHead', **head kwargs)` = what `_base_` merging yields."""
    model = _cpu_model_cfg("fcn-mv2", cac=False)
    head_kwargs = {k: v for k, v in model["decode_head"].items() if k != "type"}
    model["decode_head"] = dict(type="CACHead", head_type="FCNHead", cac=dict(tau=10.0), **head_kwargs)
    seg = build_model(model)
    assert isinstance(seg.decode_head, CACHead) and seg.decode_head.options.tau == 10.0
    assert type(seg.decode_head.head).__name__ == "FCNHead"


def test_head_type_form_gives_the_heads_init_cfg_to_the_head():
    """mmseg's heads initialise their classifier by name (``override=dict(name='conv_seg')``), which only
    the head has: in the flat form that init_cfg is the head's, and init_weights applies it there."""
    model = _cpu_model_cfg("fcn-mv2", cac=False)
    head_kwargs = {k: v for k, v in model["decode_head"].items() if k not in ("type", "init_cfg")}
    init = dict(type="Normal", std=0.01, override=dict(name="conv_seg"))
    model["decode_head"] = dict(type="CACHead", head_type="FCNHead", init_cfg=init, **head_kwargs)
    seg = build_model(model)
    seg.init_weights()
    assert seg.decode_head.head.init_cfg == init and seg.decode_head.init_cfg is None
    weight = seg.decode_head.head.conv_seg.weight
    assert 0.005 < float(weight.std()) < 0.015 and float(seg.decode_head.head.conv_seg.bias.abs().max()) == 0.0


def test_a_binary_sigmoid_head_is_refused_with_the_reason_and_the_fix():
    """mmseg's binary heads (out_channels=1, sigmoid, threshold) have one classifier row; CAC pools one
    prototype per row. The refusal says so and names the two-class form, which CAC wraps."""
    model = _cpu_model_cfg("fcn-mv2", cac=False)
    head = dict(model["decode_head"], num_classes=2, out_channels=1, threshold=0.3,
                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0))
    with pytest.raises(ValueError, match="out_channels=1.*has one row.*out_channels=2 with softmax"):
        CACHead(head=head)
    two = dict(head, out_channels=2, threshold=None, loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0))
    assert CACHead(head=two).classifier is not None


def test_plain_head_unchanged_and_cac_adds_only_projectors():
    """The wrapped model holds the plain model's state (same keys and shapes, the head's under
    ``decode_head.head.``) plus the two projectors under ``decode_head.classifier.`` and nothing else."""
    plain = build_model(_cpu_model_cfg("fcn-mv2", cac=False))
    wrapped = build_model(_cpu_model_cfg("fcn-mv2"))
    shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    ours = {k.replace("decode_head.head.", "decode_head.", 1): tuple(v.shape) for k, v in wrapped.state_dict().items()
            if not k.startswith("decode_head.classifier.")}
    assert ours == shapes
    extra = {k: v for k, v in wrapped.state_dict().items() if k.startswith("decode_head.classifier.")}
    assert {k.split(".")[2] for k in extra} == {"proj_p", "proj_y"}
    n_plain = sum(p.numel() for p in plain.parameters())
    n_cac = sum(p.numel() for p in wrapped.parameters())
    d = plain.decode_head.conv_seg.in_channels
    assert n_cac - n_plain == sum(v.numel() for v in extra.values()) == 2 * (2 * d * (d // 2) + d // 2 + (d // 2) * d + d)


def test_bad_wrapping_is_refused():
    with pytest.raises(ValueError, match="head_type"):
        CACHead()
    with pytest.raises(ValueError, match="not both"):
        CACHead(head=dict(type="FCNHead"), head_type="FCNHead")


@pytest.mark.parametrize("loss_decode", [
    dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4, avg_non_ignore=True),
    [dict(type="CrossEntropyLoss", loss_name="loss_ce", loss_weight=1.0),
     dict(type="CrossEntropyLoss", loss_name="loss_ce", loss_weight=0.5, avg_non_ignore=True)],
])
def test_fused_cross_entropy_equals_the_heads_own_loss(loss_decode):
    """p_p / p_y use the fused upsample + CE; values and gradients equal the head's loss_decode."""
    cfg = _cpu_model_cfg("fcn-slim-r18")
    cfg["decode_head"]["head"]["loss_decode"] = loss_decode
    head = build_model(cfg).decode_head
    terms = head.head.loss_decode if isinstance(head.head.loss_decode, torch.nn.ModuleList) else [head.head.loss_decode]
    assert all(map(is_plain_cross_entropy, terms))  # the fused path is the one under test
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, NUM_CLASSES, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
    seg_label = torch.randint(0, NUM_CLASSES, (2, 1, SIZE, SIZE), generator=g)
    seg_label[:, :, :5] = 255
    fused = head.segmentation_loss(logits, seg_label, accuracy=False)
    stock = {k: v for k, v in head.segmentation_loss(logits, seg_label, accuracy=True).items() if k != "acc_seg"}
    assert fused.keys() == stock.keys() == {"loss_ce"}
    torch.testing.assert_close(fused["loss_ce"], stock["loss_ce"])
    (g_fused,) = torch.autograd.grad(fused["loss_ce"], logits)
    (g_stock,) = torch.autograd.grad(stock["loss_ce"], logits)
    torch.testing.assert_close(g_fused, g_stock)
