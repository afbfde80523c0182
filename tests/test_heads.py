"""CAC on every decode head mmseg registers: each is supported (built under CACHead at tiny sizes,
two training steps with every loss term finite and gradients at θ_p, θ_y and the head's other
branches, then a prediction of the map the head's own ``predict`` uses) or refused in one line.

The list of heads is ``cac.mmseg.heads.HEADS``; the first test fails when mmseg registers a
``BaseDecodeHead`` that table does not classify (or the table names one mmseg no longer has)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from cac.errors import CacError
from cac.mmseg.heads import HEADS, registered_decode_heads, support_table_markdown
from cac.synthetic import data_samples, scene_labels

ROOT = Path(__file__).resolve().parents[1]
N, SIZE, B = 5, 64, 2
BN = dict(type="BN", requires_grad=True)
# Channels and sides of a small dilated backbone's four outputs (strides 4, 8, 8, 8 of a 64² image).
PYRAMID = ((8, 16), (16, 8), (24, 8), (32, 8))


def _pyramid(g: torch.Generator) -> tuple:
    return tuple(torch.randn(B, c, s, s, generator=g) for c, s in PYRAMID)


def _maps(*shapes: tuple[int, int]) -> Callable:
    return lambda g: tuple(torch.randn(B, c, s, s, generator=g) for c, s in shapes)


def _dpt_tokens(g: torch.Generator) -> list:
    """ViT outputs as DPTHead takes them: four [patch grid, class token] pairs."""
    return [[torch.randn(B, 16, 4, 4, generator=g), torch.randn(B, 16, generator=g)] for _ in range(4)]


OHEM = dict(type="OhemCrossEntropy", thres=0.9, min_kept=64)
ONE = dict(in_channels=32, in_index=3, channels=16)
ALL = dict(in_channels=[8, 16, 24, 32], in_index=[0, 1, 2, 3], channels=16)

# name -> (head kwargs besides num_classes/norm, train inputs, test inputs or None (= train's), branch
# parameters that must get a gradient, branch loss keys). Inputs are a tuple of forward arguments.
SPECS: dict[str, tuple] = {
    "ANNHead": (dict(in_channels=[24, 32], in_index=[2, 3], channels=16, project_channels=8,
                     key_pool_scales=(1, 3)), None, None, (), ()),
    "APCHead": (dict(ONE, pool_scales=(1, 2)), None, None, (), ()),
    "ASPPHead": (dict(ONE, dilations=(1, 2, 3)), None, None, (), ()),
    "CCHead": (dict(ONE, recurrence=1), None, None, (), ()),
    "DAHead": (dict(ONE, pam_channels=8), None, None, ("pam_conv_seg.weight", "cam_conv_seg.weight"),
               ("pam.loss_ce", "cam.loss_ce")),
    "DDRHead": (dict(in_channels=32, channels=16, loss_decode=[dict(OHEM), dict(OHEM, loss_weight=0.4)]),
                lambda g: ((torch.randn(B, 16, 8, 8, generator=g), torch.randn(B, 32, 8, 8, generator=g)),),
                lambda g: (torch.randn(B, 32, 8, 8, generator=g),), ("aux_cls_seg.weight",), ("loss_spatial",)),
    "DMHead": (dict(ONE, filter_sizes=(1, 3)), None, None, (), ()),
    "DNLHead": (dict(ONE), None, None, (), ()),
    "DPTHead": (dict(in_channels=(16,) * 4, in_index=(0, 1, 2, 3), input_transform="multiple_select", channels=16,
                     embed_dims=16, post_process_channels=[4, 8, 16, 16], readout_type="project"),
                lambda g: (_dpt_tokens(g),), None, (), ()),
    "DepthwiseSeparableASPPHead": (dict(ONE, dilations=(1, 2), c1_in_channels=8, c1_channels=8), None, None, (), ()),
    "DepthwiseSeparableFCNHead": (dict(ONE), None, None, (), ()),
    "EMAHead": (dict(ONE, ema_channels=16, num_bases=8, num_stages=2), None, None, (), ()),
    "EncHead": (dict(in_channels=[16, 24, 32], in_index=[1, 2, 3], channels=16, num_codes=8, add_lateral=True),
                None, None, ("se_layer.weight",), ("loss_se",)),
    "FCNHead": (dict(ONE, num_convs=1), None, None, (), ()),
    "FPNHead": (dict(ALL, feature_strides=[4, 8, 8, 8]), None, None, (), ()),
    "GCHead": (dict(ONE), None, None, (), ()),
    "ISAHead": (dict(ONE, isa_channels=8, down_factor=(2, 2)), None, None, (), ()),
    # LR-ASPP pools its last input with a 49 x 49 window.
    "LRASPPHead": (dict(in_channels=(8, 16, 16), in_index=(0, 1, 2), input_transform="multiple_select", channels=16,
                        branch_channels=(8, 8)), lambda g: (_maps((8, 64), (16, 56), (16, 56))(g),), None, (), ()),
    "LightHamHead": (dict(in_channels=[16, 24, 32], in_index=[1, 2, 3], channels=16, ham_channels=16,
                          ham_kwargs=dict(MD_R=4)), None, None, (), ()),
    "NLHead": (dict(ONE), None, None, (), ()),
    "OCRHead": (dict(ONE, ocr_channels=8),
                lambda g: (_pyramid(g), torch.randn(B, N, 8, 8, generator=g)), None, (), ()),
    "PIDHead": (dict(in_channels=32, channels=16, loss_decode=[
                    dict(type="CrossEntropyLoss", loss_weight=0.4), dict(OHEM),
                    dict(type="BoundaryLoss", loss_weight=20.0), dict(OHEM)]),
                lambda g: (tuple(torch.randn(B, c, 8, 8, generator=g) for c in (16, 32, 16)),),
                lambda g: (torch.randn(B, 32, 8, 8, generator=g),), ("p_cls_seg.weight", "d_cls_seg.weight"),
                ("loss_sem_p", "loss_bd", "loss_sem_bd")),
    "PSAHead": (dict(ONE, mask_size=(8, 8)), None, None, (), ()),
    "PSPHead": (dict(ONE, pool_scales=(1, 2, 3, 6)), None, None, (), ()),
    "SETRMLAHead": (dict(in_channels=[16, 24, 32], in_index=[1, 2, 3], channels=12, mla_channels=4, up_scale=2),
                    None, None, (), ()),
    "SETRUPHead": (dict(ONE, num_convs=1, up_scale=2), None, None, (), ()),
    "SegformerHead": (dict(ALL), None, None, (), ()),
    "UPerHead": (dict(ALL, pool_scales=(1, 2)), None, None, (), ()),
}
SUPPORTED = sorted(n for n, s in HEADS.items() if s.supported)
REFUSED = sorted(n for n, s in HEADS.items() if not s.supported)


def test_every_registered_decode_head_is_classified():
    """mmseg 1.2.2 registers 34 BaseDecodeHead subclasses; each is in the table, supported or refused."""
    registered = set(registered_decode_heads())
    assert registered == set(HEADS), (f"not in cac.mmseg.heads.HEADS: {sorted(registered - set(HEADS))}; "
                                      f"no longer registered: {sorted(set(HEADS) - registered)}")
    assert len(registered) == 34
    assert set(SPECS) == set(SUPPORTED), "every supported head has a tiny configuration here"


def test_the_heads_guide_has_the_head_table():
    assert support_table_markdown() in (ROOT / "docs" / "heads.md").read_text()


def _samples(seed: int, edges: bool) -> list:
    from mmengine.structures import PixelData

    g = torch.Generator().manual_seed(seed)
    labels = scene_labels(B, SIZE, N, per_image=4, block=8, ignore_frac=0.1, generator=g)
    samples = data_samples(SIZE, B, labels)
    if edges:  # PIDNet's pipeline adds boundary maps (GenerateEdge)
        for s, lab in zip(samples, labels):
            edge = torch.zeros_like(lab, dtype=torch.uint8)
            edge[1:] |= (lab[1:] != lab[:-1]).to(torch.uint8)
            edge[:, 1:] |= (lab[:, 1:] != lab[:, :-1]).to(torch.uint8)
            s.gt_edge_map = PixelData(data=edge[None])
    return samples


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_head_trains_and_predicts_under_cac(name):
    from mmseg.registry import MODELS

    from cac.mmseg.head import CACHead

    kwargs, train_inputs, test_inputs, branch_params, branch_losses = SPECS[name]
    train_inputs = train_inputs or (lambda g: (_pyramid(g),))
    test_inputs = test_inputs or train_inputs
    torch.manual_seed(0)
    head = MODELS.build(dict(type="CACHead", head=dict(type=name, num_classes=N, norm_cfg=BN, dropout_ratio=0.1,
                                                        **kwargs)))
    assert isinstance(head, CACHead) and type(head.head).__name__ == name
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    head.train()
    for step in range(2):
        opt.zero_grad()
        losses = head.loss(*train_inputs(g), _samples(step, edges=name == "PIDHead"), {})
        terms = {k: v for k, v in losses.items() if "loss" in k}
        # the four terms of Eq. (8): p's CE under the head's own name for the map, L_p^ce, L_y^ce, L_KL
        ctx = [k for k in terms if k.startswith("loss_ctx_")]
        assert len(ctx) == 1 and f"loss_oracle_{ctx[0][9:]}" in terms and "loss_kl" in terms, sorted(terms)
        assert f"loss_{ctx[0][9:]}" in terms
        assert set(branch_losses) <= set(terms), sorted(terms)
        for key, value in terms.items():
            assert torch.isfinite(value), (key, value)
        sum(terms.values()).backward()
        for proj in (head.classifier.proj_p, head.classifier.proj_y):
            assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                       for p in proj.parameters())
        assert head.head.conv_seg.weight.grad.abs().sum() > 0
        params = dict(head.head.named_parameters())
        for key in branch_params:
            assert params[key].grad is not None and params[key].grad.abs().sum() > 0, key
        opt.step()

    head.eval()
    inputs = test_inputs(g)
    metas = [s.metainfo for s in _samples(0, edges=False)]
    with torch.no_grad():
        logits = head.predict(*inputs, metas, {})
        assert logits.shape == (B, N, SIZE, SIZE) and torch.isfinite(logits).all()
        # CAC classifies the map the head's own predict uses (its cls_seg now hands back features).
        torch.manual_seed(2)  # LightHam's NMF starts from random bases at each call
        own = head.head.predict(*inputs, metas, {})
        torch.manual_seed(2)
        torch.testing.assert_close(own, head.head.predict_by_feat(head.features(*inputs), metas))
        assert own.shape[1] == head.head.conv_seg.in_channels
        # and its values are Eqs. (4)-(6) on those features with the head's own conv_seg, in float64
        torch.manual_seed(2)
        feats = head.features(*inputs)
        torch.manual_seed(2)
        p_p = head.forward(*inputs)
        torch.testing.assert_close(p_p.double(), _p_p_formula(head, feats.double()), rtol=1e-4, atol=1e-4)
        torch.manual_seed(2)
        torch.testing.assert_close(head.predict(*inputs, metas, {}), head.head.predict_by_feat(p_p, metas))


def _p_p_formula(head, f: torch.Tensor) -> torch.Tensor:
    """p_p written out: p from ``conv_seg``, soft prototypes (Eq. 4), A_p = design(C_p, C) (Eq. 5) and
    the cosine classifier tau * eta(f) . eta(A_p) (Eq. 6)."""
    import copy

    import torch.nn.functional as F

    cac, conv = head.classifier, head.head.conv_seg
    weight, bias = conv.weight.flatten(1).double(), conv.bias.double()
    p = torch.einsum("nd,bdhw->bnhw", weight, f) + bias[:, None, None]
    prob = p.flatten(2).softmax(1)
    c_p = prob @ f.flatten(2).transpose(1, 2) / prob.sum(2, keepdim=True)
    a_p = cac.form(cac.options.design_p, c_p, weight, copy.deepcopy(cac.proj_p).double())
    return cac.options.tau * torch.einsum("bnd,bdhw->bnhw", F.normalize(a_p, dim=-1, eps=1e-6),
                                          F.normalize(f, dim=1, eps=1e-6))


@pytest.mark.parametrize("name", REFUSED)
def test_refused_head_is_one_line_before_it_is_built(name):
    """The head's config has none of its required arguments: a refusal after building would be a
    TypeError from the head's constructor, not this CacError."""
    from mmseg.registry import MODELS

    with pytest.raises(CacError) as err:
        MODELS.build(dict(type="CACHead", head=dict(type=name, num_classes=N)))
    message = str(err.value)
    assert "\n" not in message and name in message and HEADS[name].refused in message


def test_non_decode_head_and_unknown_head_are_refused():
    from mmseg.registry import MODELS

    with pytest.raises(CacError, match="MaskFormerHead: it is not a BaseDecodeHead"):
        MODELS.build(dict(type="CACHead", head=dict(type="MaskFormerHead")))
    with pytest.raises(CacError, match="no decode head of that name"):
        MODELS.build(dict(type="CACHead", head_type="NoSuchHead"))


SPEC = """\
title: heads under CAC
model: fcn-slim-r18
seeds: 1
rows:
  - {label: "(a)", description: plain FCN, cac: false}
  - {label: "(d)", description: a depth head, cac: true, overrides: {model.decode_head.head.type: VPDDepthHead}}
  - {label: "(k)", description: K-Net, cac: true, overrides: {model.decode_head.head.type: IterativeDecodeHead}}
  - {label: "(t)", description: CACHead replaced, cac: true, overrides: {model.decode_head.type: DAHead}}
"""


@pytest.mark.parametrize("row, words", [
    ("(d)", ["CAC cannot wrap VPDDepthHead", "depth"]),
    ("(k)", ["CAC cannot wrap IterativeDecodeHead", "K-Net"]),
    ("(t)", ["'DAHead' in place of CACHead", "model.decode_head.head.type"]),
])
def test_a_spec_row_naming_a_refused_head_is_one_line_exit_2(tmp_path, monkeypatch, capsys, row, words):
    """`cac-exp config` and `cac-exp run --dry-run`: one line, exit 2, no store, no work dir."""
    from cac.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CAC_WORK_DIR", str(tmp_path / "work_dirs"))
    spec = tmp_path / "heads.yaml"
    spec.write_text(SPEC)
    assert main(["config", str(spec), "--row", "(a)", "--preset", "quick"]) == 0  # the spec itself is fine
    capsys.readouterr()
    for argv in (["config", str(spec), "--row", row, "--preset", "quick"],
                 ["run", str(spec), "--rows", row, "--preset", "quick", "--dry-run"]):
        code = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
        for word in words:
            assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.yaml"]


@pytest.mark.parametrize("kind", ["gmmseg", "protoseg"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_head_trains_and_predicts_with_the_other_classifiers(name, kind):
    """The same wrapper ends every supported head with GMMSeg or ProtoSeg: a training step with the
    head's own loss on the classifier's logits, the classifier's own terms and the head's other
    branches' terms, all finite, gradients at the head and the classifier, the head's unused conv_seg
    left untrained (stock DDP waits for no gradient), the state moving, and a prediction of the map the
    head's predict would make."""
    from mmseg.registry import MODELS

    kwargs, train_inputs, test_inputs, branch_params, branch_losses = SPECS[name]
    train_inputs = train_inputs or (lambda g: (_pyramid(g),))
    test_inputs = test_inputs or train_inputs
    torch.manual_seed(0)
    classifier = dict(type=kind, **({"mem_size": 30, "num_components": 2} if kind == "gmmseg" else {"num_prototypes": 2}))
    head = MODELS.build(dict(type="ClassifierHead", head=dict(type=name, num_classes=N, norm_cfg=BN, dropout_ratio=0.1,
                                                              **kwargs), classifier=classifier))
    state = {k: v.clone() for k, v in head.classifier.named_buffers() if "running" not in k and "batches" not in k}
    assert not head.head.conv_seg.weight.requires_grad
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(1)
    head.train()
    own = {"gmmseg": {"loss_contrast"}, "protoseg": {"loss_ppc", "loss_ppd"}}[kind]
    for step in range(1):
        opt.zero_grad()
        losses = head.loss(*train_inputs(g), _samples(step, edges=name == "PIDHead"), {})
        terms = {k: v for k, v in losses.items() if "loss" in k}
        assert own <= set(terms) and set(branch_losses) <= set(terms), sorted(terms)
        assert all(torch.isfinite(v) for v in terms.values()), terms
        sum(terms.values()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.classifier.parameters()
                   if p.requires_grad)
        assert head.classifier.mask_norm.weight.grad.abs().sum() > 0
        params = dict(head.head.named_parameters())
        for key in branch_params:
            assert params[key].grad is not None and params[key].grad.abs().sum() > 0, key
        opt.step()
    moved = {k: v for k, v in head.classifier.named_buffers() if k in state}
    assert any(not torch.equal(moved[k], state[k]) for k in state)
    head.eval()
    metas = [s.metainfo for s in _samples(0, edges=False)]
    with torch.no_grad():
        logits = head.predict(*test_inputs(g), metas, {})
    assert logits.shape == (B, N, SIZE, SIZE) and torch.isfinite(logits).all()
