"""SSA-Seg's additions (cac.core.ssa) as switches of CACOptions: all off is CAC, each on adds only its
own part, and every part equals a reference written out here with loops (float64)."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cac.core.classifier import PROFILES, CACOptions, ContextAwareClassifier, cac_losses
from cac.core.functional import entropy_kl_loss, upsampled_cross_entropy
from cac.core.ssa import (boundary_mask, dice_loss, oracle_positions, position_distill_loss,
                          relation_distill_loss)

N, D = 7, 12
SSA_KEYS = [f.name for f in dataclasses.fields(CACOptions) if f.name.startswith("ssa_")]


def _scene(b=2, h=20, w=28, seed=0, dtype=torch.float64):
    """Features, classifier and labels at 4x the features' size: rectangles of a few classes (most of
    the N absent; class 3 only in even images, as a class present in one image of a batch and absent
    from the next), an ignored band, confident-looking logits scales."""
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(b, D, h, w, generator=g) * 2).to(dtype).requires_grad_(True)
    weight = (torch.randn(N, D, generator=g) * 3).to(dtype).requires_grad_(True)
    bias = torch.randn(N, generator=g).to(dtype)
    labels = torch.full((b, 4 * h, 4 * w), 1, dtype=torch.long)
    for i in range(b):
        for k, (y0, x0, y1, x1) in zip((0, 2, 3), ((8, 10, 50, 60), (30, 40, 78, 100), (0, 70, 30, 112))):
            if k != 3 or i % 2 == 0:
                labels[i, y0 + 4 * i:y1, x0:x1 - 6 * i] = k
        labels[i, :, :9] = 255
    return feats, weight, bias, labels


def _losses(options: dict, seed: int = 0, scene=None):
    torch.manual_seed(seed)
    o = CACOptions.from_dict(options)
    model = ContextAwareClassifier(D, N, o).double()
    feats, weight, bias, labels = scene or _scene()
    out = model(feats, weight, bias, labels)
    losses = cac_losses(out, labels, o, ce=lambda logits, acc: {"loss_ce": _head_ce(logits, labels)})
    return model, out, losses


def _head_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """A head's own CE, as mmseg heads upsample (align_corners=False), mean over all pixels."""
    return upsampled_cross_entropy(logits, labels, align_corners=False).mean()


def test_ssa_profile_is_official_cac_plus_every_ssa_switch():
    ssa, official = PROFILES["ssa"], PROFILES["official"]
    assert {k: v for k, v in ssa.items() if not k.startswith("ssa_") and k != "ctx_upsample"} == official
    o = CACOptions.from_dict({"profile": "ssa"})
    assert o.uses_ssa and all(getattr(o, k) for k in SSA_KEYS)
    assert (o.ssa_relation, o.ssa_pos_distill, o.ssa_dice) == (10.0, 0.4, 1.0)  # the official heads' weights
    assert not CACOptions.from_dict({"profile": "official"}).uses_ssa


BEFORE_SSA = "1bfe319e8234c21367961d174ab8ca2c9ed3946e"  # the last commit without SSA-Seg's switches
ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "before_ssa.json"  # its outputs as digests (benchmarks/same_outputs.py --record)


def _same_outputs():
    spec = importlib.util.spec_from_file_location("same_outputs", ROOT / "benchmarks" / "same_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _differing(ours: dict, theirs: dict) -> list[str]:
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def test_with_every_switch_off_cac_gives_the_outputs_of_the_code_before_ssa_to_the_bit():
    """The default options (every SSA switch off) against the code before SSA-Seg was added, as its
    digests recorded in tests/golden (predict, Eq. 4, Eq. 6, one training step's losses and gradients
    under profiles paper and official, float32 and float64): every output bitwise equal. Needs no
    history; the test below shows the golden file is that commit's."""
    import json

    golden = json.loads(GOLDEN.read_text())
    module = _same_outputs()
    from components import require

    require("the platform the golden digests were recorded on",
            "" if golden["platform"] == module.platform() else
            f"recorded on {golden['platform']}, this is {module.platform()} (bitwise outputs differ across CPU "
            "kernels)", f"record them here: python benchmarks/same_outputs.py --record {GOLDEN.relative_to(ROOT)} "
            f"--of {BEFORE_SSA[:12]}")
    ours = module.digests(module.outputs_of(None))
    assert len(ours) == 64 and _differing(ours, golden["outputs"]) == []


def test_the_golden_outputs_are_those_of_the_commit_before_ssa():
    """Regenerated from the commit before SSA-Seg (its `cac`, exported with git archive), the outputs
    are the golden file's, digest for digest (CI has the history; a shallow clone skips, or fails
    under CI)."""
    import json

    from components import require_commit

    require_commit(BEFORE_SSA, "the last commit before SSA-Seg")
    golden = json.loads(GOLDEN.read_text())
    assert golden["commit"] == BEFORE_SSA
    module = _same_outputs()
    assert _differing(module.digests(module.outputs_of(BEFORE_SSA)), golden["outputs"]) == []


@pytest.mark.parametrize("switch,added,changed", [
    ({"ssa_dice": 1.0}, {"loss_dice", "loss_oracle_dice"}, set()),
    ({"ssa_relation": 10.0}, {"loss_relation"}, set()),
    ({"ssa_kl_edges": True}, set(), {"loss_kl"}),
    ({"ssa_pixel_pos": True}, set(), {"loss_ctx_ce", "loss_oracle_ce", "loss_kl"}),
    ({"ssa_center_pos": True}, set(), {"loss_ctx_ce", "loss_kl"}),
    ({"ssa_gt_pos": True}, set(), {"loss_oracle_ce", "loss_kl"}),
    ({"ctx_upsample": "aligned"}, set(), {"loss_ctx_ce"}),
])
def test_each_switch_adds_or_changes_only_its_own_terms(switch, added, changed):
    _, out0, base = _losses({"profile": "official"})
    _, out1, got = _losses({"profile": "official", **switch})
    assert set(got) == set(base) | added
    for key in base:
        if key in changed:
            assert not torch.allclose(got[key], base[key]), key
        else:
            assert torch.equal(got[key], base[key]), key
    assert torch.equal(out0.p, out1.p)  # the original classifier is never touched
    for key in added:
        assert torch.isfinite(got[key]) and got[key] > 0


def test_pos_distill_needs_both_position_switches_and_ssa_needs_cosine_context():
    with pytest.raises(ValueError, match="ssa_center_pos and ssa_gt_pos"):
        CACOptions.from_dict({"ssa_pos_distill": 0.4, "ssa_center_pos": True})
    with pytest.raises(ValueError, match="context='cos'"):
        CACOptions.from_dict({"ssa_dice": 1.0, "context": "dot"})
    with pytest.raises(ValueError, match="class-wise"):
        CACOptions.from_dict({"ssa_kl_edges": True, "kl_normaliser": "literal"})
    with pytest.raises(ValueError, match="ssa_relation must be >= 0"):
        CACOptions.from_dict({"ssa_relation": -1.0})


# ---- references written with loops (nothing from cac.core.ssa) ----------------------------------------

def ref_dice(logits: Tensor, labels: Tensor) -> Tensor:
    terms = []
    for i in range(logits.shape[0]):
        s = torch.sigmoid(logits[i])
        for k in labels[i].unique().tolist():
            if k == 255:
                continue
            t = (labels[i] == k).to(s.dtype)
            terms.append(1 - (2 * (s[k] * t).sum() + 1) / (s[k].sum() + t.sum() + 1))
    return torch.stack(terms).sum() / max(len(terms), 1)


def ref_relation(a: Tensor, b: Tensor) -> Tensor:
    total = 0.0
    bsz, n, _ = a.shape
    for i in range(bsz):
        for k in range(n):
            def row(c):
                sims = torch.stack([F.cosine_similarity(c[i, k], c[i, j], dim=0, eps=1e-30) for j in range(n)])
                return torch.softmax(15.0 * sims, dim=0)
            ra, rb = row(a), row(b)
            total = total + sum(torch.relu(ra[j] - rb[j]) for j in range(n) if j != k)
    return total / (bsz * n)


def test_dice_equals_its_loop_reference_and_ignored_pixels_only_add_to_the_prediction_sum():
    feats, _, _, labels = _scene()
    logits = torch.randn(2, N, *labels.shape[-2:], dtype=torch.float64) * 4
    assert torch.allclose(dice_loss(logits, labels), ref_dice(logits, labels), rtol=0, atol=1e-12)
    # an image with nothing labelled adds no term; none at all gives 0
    empty = torch.full_like(labels, 255)
    assert dice_loss(logits, empty) == 0
    mixed = torch.stack([labels[0], empty[1]])
    assert torch.allclose(dice_loss(logits, mixed), ref_dice(logits[:1], labels[:1]), atol=1e-12)


def test_relation_and_position_distillation_equal_their_references():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    got = relation_distill_loss(a, b)
    assert torch.allclose(got, ref_relation(a.detach(), b), rtol=0, atol=1e-12)
    assert relation_distill_loss(b, b) == 0  # no excess over itself
    got.backward()
    assert a.grad.abs().sum() > 0
    pos, gt = torch.randn(2, N, D, generator=g, dtype=torch.float64), torch.randn(2, N, D, generator=g, dtype=torch.float64)
    want = torch.stack([-(torch.softmax(gt[i, k], 0) * torch.log_softmax(pos[i, k], 0)).sum()
                        for i in range(2) for k in range(N)]).mean()
    assert torch.allclose(position_distill_loss(pos, gt), want, rtol=0, atol=1e-12)


def test_oracle_positions_pool_each_images_labelled_pixels_and_fill_absent_classes_with_the_embedding():
    g = torch.Generator().manual_seed(4)
    pos = torch.randn(2, D, 6, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 6, 9), generator=g)
    labels[0, :2] = 255
    labels[1][labels[1] == 2] = 0  # class 2 absent from image 1 only
    emb = torch.randn(N, D, generator=g, dtype=torch.float64)
    got = oracle_positions(pos, labels, emb, torch.nn.Identity())  # identity: the concatenation itself
    for i in range(2):
        for k in range(N):
            mask = labels[i] == k
            want = pos[i][:, mask].mean(1) if mask.any() else emb[k]
            assert torch.allclose(got[i, k, :D], want, atol=1e-12), (i, k)
            assert torch.equal(got[i, k, D:], emb[k])


def test_boundary_mask_marks_label_changes_away_from_the_border():
    labels = torch.zeros(1, 40, 48, dtype=torch.long)
    labels[0, 10:30, 20:48] = 3  # a block touching the right border
    labels[0, :, :4] = 255  # ignored: a label like any other here, but within the margin
    mask = boundary_mask(labels)[0].numpy()
    # edges within 6 px of the border are dropped before the 3x3 dilation, which may reach 1 px further
    assert mask[:, :5].sum() == 0 and mask[:5].sum() == 0 and mask[-5:].sum() == 0 and mask[:, -5:].sum() == 0
    assert mask[10, 22:40].all() or mask[9, 22:40].all()  # the block's top edge, dilated
    assert mask[20, 18:22].any()  # its left edge
    assert not mask[20, 28:40].any() and not mask[3:7, 10:40].any()  # interiors stay interior
    uniform = boundary_mask(torch.full((2, 30, 30), 5))
    assert not uniform.any() and uniform.shape == (2, 30, 30)


def test_kl_boundary_split_averages_each_classs_boundary_and_interior_parts():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, N, 16, 20, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, N, 16, 20, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 4, (2, 16, 20), generator=g)
    labels[:, :, :3] = 255
    boundary = torch.rand(2, 16, 20, generator=g) < 0.3
    labels[boundary & (labels == 3)] = 0  # class 3 has no boundary pixels: its boundary part adds 0
    got = entropy_kl_loss(student, teacher, labels, target_mix=0.5, boundary=boundary, eps=1e-12)
    t = torch.softmax(teacher, 1)
    onehot = F.one_hot(labels.clamp_max(N - 1), N).permute(0, 3, 1, 2).to(t.dtype)
    per_pixel = -(torch.log_softmax(student, 1) * (0.5 * t + 0.5 * onehot)).sum(1)
    ent = -(t * torch.log(t + 1e-12)).sum(1) * (labels != 255)
    parts = []
    for k in labels.unique().tolist():
        if k == 255:
            continue
        halves = []
        for region in (boundary, ~boundary):
            w = ent * (labels == k) * region
            halves.append((per_pixel * w).sum() / (w.sum() + 1e-12))
        parts.append(sum(halves) / 2)
    assert torch.allclose(got, torch.stack(parts).mean(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="class-wise"):
        entropy_kl_loss(student, teacher, labels, classwise=False, boundary=boundary)


# ---- the head ------------------------------------------------------------------------------------

def _head(cac: dict, head_type: str = "FCNHead"):
    from mmseg.registry import MODELS

    import cac as _  # noqa: F401 - registers CACHead

    cfg = dict(type=head_type, in_channels=16, channels=D, num_convs=1, concat_input=False, dropout_ratio=0.1,
               num_classes=N, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False)
    torch.manual_seed(0)
    return MODELS.build(dict(type="CACHead", head=cfg, cac=cac))


def _samples(labels: Tensor):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    return [SegDataSample(gt_sem_seg=PixelData(data=lab[None])) for lab in labels]


def test_ssa_head_trains_every_parameter_and_predicts_with_positions():
    head = _head({"profile": "ssa"}).train()
    _, _, _, labels = _scene(h=12, w=16)
    inputs = [torch.randn(2, 16, 12, 16)]
    losses = head.loss(inputs, _samples(labels), {})
    assert {"loss_dice", "loss_oracle_dice", "loss_relation", "loss_pos", "loss_kl"} <= set(losses)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    # stock DDP (find_unused_parameters=False) needs a gradient for every trainable parameter
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    head.eval()
    with torch.no_grad():
        pred = head(inputs)
        feats = head.features(inputs)
        want = head.classify(feats).p_p
    assert torch.equal(pred, want)
    plain = _head({"profile": "official"}).eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if "classifier.ssa" not in k})
    with torch.no_grad():
        assert not torch.allclose(plain(inputs), pred)  # the positions change the test output


def test_ssa_params_beside_cacs():
    """SSA-Seg adds to CAC's projectors: the position conv, N embeddings, two position projectors and
    two d x d maps (d = 512, 150 classes: 1.39 M beside CAC's 0.79 M)."""
    d, n = 512, 150
    count = lambda o: sum(p.numel() for p in ContextAwareClassifier(d, n, CACOptions.from_dict(o)).parameters())
    cac, ssa = count({"profile": "official"}), count({"profile": "ssa"})
    projector = 2 * d * (d // 2) + (d // 2) * d + d
    assert cac == 2 * projector
    assert ssa - cac == (d * 9 + d) + n * d + 2 * projector + 2 * d * d


def _ssa_rows():
    from pathlib import Path

    from cac.exp.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "ablations" / "ssa.yaml")
    return [pytest.param(row.cac, id=row.label) for row in spec.rows if row.cac is not None]


@pytest.mark.parametrize("cac", _ssa_rows())
def test_every_ssa_row_gives_every_trainable_parameter_a_gradient(cac):
    """Stock DDP (find_unused_parameters=False) waits for a gradient of every trainable parameter:
    each row of ablations/ssa.yaml builds only what its losses use."""
    head = _head(cac).train()
    _, _, _, labels = _scene(h=12, w=16)
    losses = head.loss([torch.randn(2, 16, 12, 16)], _samples(labels), {})
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_without_oracle_training_the_oracle_only_modules_are_frozen():
    """loss_ce_y = 0 and no dice: nothing trains p_y's modules (its distillations' teachers are
    detached), so they are frozen, as theta_y is, for stock DDP; the estimate's stay trainable."""
    model = ContextAwareClassifier(D, N, CACOptions.from_dict(
        {"profile": "official", "loss_ce_y": 0.0, "ssa_gt_pos": True}))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("proj_y.", "ssa.oracle_", "ssa.centre_pos.", "ssa.pixel_pos."))}
    model = ContextAwareClassifier(D, N, CACOptions.from_dict(
        {"profile": "ssa", "loss_ce_y": 0.0, "ssa_dice": 0.0}))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("proj_y.", "ssa.oracle_"))}
    feats, weight, bias, labels = _scene()
    out = model.double()(feats, weight, bias, labels)
    losses = cac_losses(out, labels, model.options, ce=lambda logits, acc: {"loss_ce": _head_ce(logits, labels)})
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
