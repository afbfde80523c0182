"""The shapes of real data that broke the paper path: images of different sizes in one evaluation
batch, the logits of a confident network in Eq. (4), a DDP sampler's padding, tiny layouts that vary
as the real datasets do."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cac.core import functional as fn
from cac.synthetic import confident_logits, mixed_seg_batch

NUM_CLASSES = 12  # the quick preset's context-scenes classes


# -- Eq. (4) at the confidence of a trained network ----------------------------------------------
def _eq4(feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Eq. (4) as printed, in float64: softmax over classes, then each class's weighted mean of f."""
    b, d = feats.shape[:2]
    prob = logits.double().softmax(1).flatten(2)  # [B, N, L]
    return (prob @ feats.double().flatten(2).transpose(1, 2)) / prob.sum(2, keepdim=True)


def test_soft_pool_is_eq4_at_a_25_logit_gap_in_float32():
    """The issue's case: 64x64 map, 150 classes, class 7 25 logits below the top everywhere: its soft
    mass is ~6e-8, below the old 1e-6 floor, which shrank |C_p| from 3.17 to 0.026."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 32, 64, 64, generator=g) + 0.5
    logits = torch.randn(1, 150, 64, 64, generator=g)
    logits[:, 7] = logits.amax(1) - 25.0
    ours = fn.soft_pool(feats, logits)
    ref = _eq4(feats, logits)
    rel = (ours.double() - ref).norm(dim=-1) / ref.norm(dim=-1)  # per class centre
    assert float(rel.max()) < 1e-6 and float(rel[0, 7]) < 1e-6
    assert float(logits.double().softmax(1)[:, 7].sum()) < 1e-6  # the regime the old floor broke
    # the official numerics add 1e-12 to the mass, as the official code does: a visible shrink here
    official = fn.soft_pool(feats, logits, eps=1e-12)
    mass = logits.double().softmax(1)[:, 7].sum()
    shrunk = ref[0, 7] * mass / (mass + 1e-12)
    assert float((official[0, 7].double() - shrunk).norm() / shrunk.norm()) < 1e-5


@pytest.mark.parametrize("gap", [25.0, 60.0])
def test_soft_pool_gradients_at_large_gaps_equal_autograd_of_eq4(gap):
    """float64: our node's gradients equal autograd through the printed formula, where masses are
    1e-8 (gap 25) and 1e-23 (gap 60); float32 stays finite and close to them."""
    logits = confident_logits(2, 20, 16, gap, seed=1, dtype=torch.float64).requires_grad_(True)
    feats = torch.randn(2, 8, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    upstream = torch.randn(2, 20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = torch.autograd.grad((fn.soft_pool(feats, logits) * upstream).sum(), (logits, feats))
    ref = torch.autograd.grad((_eq4(feats, logits) * upstream).sum(), (logits, feats))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    l32, f32 = logits.detach().float().requires_grad_(True), feats.detach().float().requires_grad_(True)
    out32 = fn.soft_pool(f32, l32)
    torch.testing.assert_close(out32.double(), _eq4(feats, logits).detach(), rtol=1e-4, atol=1e-5)
    g32 = torch.autograd.grad((out32 * upstream.float()).sum(), (l32, f32))
    for a, b in zip(g32, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("gap", [25.0, 60.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_pool_in_half_precision_keeps_absent_classes_soft_means(dtype, gap):
    """Under AMP the masks are formed in float32 and scaled per class before the one cast, so an
    absent class 25 or 60 logits down keeps its soft mean (in fp16 its softmax entries, ~1e-11 and
    ~1e-26, would flush to zero, and so would they after a floor of 1e-6 on the mass: only the scale
    taken from the mass itself lifts them); values within half precision's rounding of Eq. (4)."""
    logits = confident_logits(1, 30, 32, gap, seed=4)
    feats = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(5)) + 0.3
    feats, logits = feats.to(dtype), logits.to(dtype)  # what AMP hands over, rounded as it rounds them
    ref = _eq4(feats, logits)  # the printed formula in float64 on those inputs
    out = fn.soft_pool(feats, logits)
    assert torch.isfinite(out).all()
    rel = ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert rel < (1e-3 if dtype == torch.float16 else 8e-3)  # the output's own rounding (2^-11, 2^-8)


def test_whole_head_at_large_gaps_float32_and_autocast_match_float64():
    """A +CAC FCN head whose classifier is x300 (logit gaps of a trained network): p_p and the losses in
    float32 equal the float64 computation; under CPU autocast (bfloat16) everything stays finite."""
    from cac.mmseg.config import resolve_config
    from cac.mmseg.params import build_model
    from cac.synthetic import seg_batch

    cfg = resolve_config("fcn-slim-r18", "quick", cac=True, overrides={"model.decode_head.head.dropout_ratio": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg["model"]).train()
    with torch.no_grad():
        model.decode_head.head.conv_seg.weight.mul_(300.0)
    model64 = build_model(cfg["model"]).train()
    model64.load_state_dict(model.state_dict())  # before either forward moves BN's running statistics
    model64 = model64.double()
    data = model.data_preprocessor(seg_batch(64, 2, NUM_CLASSES, per_image=3, block=8), True)
    inputs, samples = data["inputs"], data["data_samples"]
    loss32 = {k: v for k, v in model.loss(inputs, samples).items() if k.startswith("decode.loss")}
    head = model.decode_head
    loss64 = {k: v for k, v in model64.loss(inputs.double(), samples).items() if k.startswith("decode.loss")}
    for key in loss64:
        torch.testing.assert_close(loss32[key].double(), loss64[key], rtol=2e-4, atol=1e-6, msg=key)
    model.eval(), model64.eval()
    with torch.no_grad():
        out32 = head.forward(model.extract_feat(inputs))
        out64 = model64.decode_head.forward(model64.extract_feat(inputs.double()))
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        p = head.all_logits(model.extract_feat(inputs)).p
    assert torch.isfinite(p).all() and float((p.amax(1, keepdim=True) - p).amax()) > 25  # the confident regime
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(inputs, samples)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_kl_entropy_weights_of_a_confident_teacher_are_not_floored():
    """Eq. (11) with a teacher so confident that every entropy is ~1e-9: the class-wise normaliser is
    their sum, not a floor (the old 1e-6 floor scaled such a class's term down by ~1000)."""
    student = confident_logits(1, 10, 8, 3.0, seed=6, dtype=torch.float64)
    teacher = confident_logits(1, 10, 8, 28.0, seed=6, dtype=torch.float64)
    labels = teacher.argmax(1)
    entropy = fn.pixel_entropy(teacher)
    assert float(entropy.max()) < 1e-8
    loss = fn.entropy_kl_loss(student, teacher, labels)
    per_pixel = -(teacher.softmax(1) * student.log_softmax(1)).sum(1)
    classes = labels.unique()
    ref = sum(float((per_pixel * entropy)[labels == k].sum() / entropy[labels == k].sum()) for k in classes) / len(classes)
    assert float(loss) == pytest.approx(ref, rel=1e-9)


# -- images of different sizes in one batch --------------------------------------------------------
@pytest.fixture(scope="module")
def cac_model():
    from cac.mmseg.config import resolve_config
    from cac.mmseg.params import build_model

    torch.manual_seed(0)
    return build_model(resolve_config("fcn-slim-r18", "quick", cac=True)["model"]).eval()


SHAPES = [(48, 64), (64, 48), (40, 72), (48, 64), (56, 56)]


@pytest.mark.parametrize("label_scale", [1, 2])
def test_three_classifier_confusion_on_mixed_sizes_is_the_sum_of_per_image_ones(cac_model, label_scale):
    """A batch as ADE20K's test pipeline makes it (each image its own size, labels at the original
    size): the evaluation's counts equal the sum of each image evaluated alone, and every labelled
    pixel is counted once."""
    from cac.mmseg.evaluation import evaluate_pass, size_groups

    batch = mixed_seg_batch(SHAPES, NUM_CLASSES, label_scale=label_scale)
    groups = size_groups(batch)
    assert [idx for idx, _ in groups] == [[0, 3], [1], [2], [4]]
    whole = evaluate_pass(cac_model, [batch], NUM_CLASSES, explain=True)
    singles = [{"inputs": [batch["inputs"][i]], "data_samples": [batch["data_samples"][i]]} for i in range(len(SHAPES))]
    per_image = [evaluate_pass(cac_model, [one], NUM_CLASSES, explain=True) for one in singles]
    labelled = sum(int((s.gt_sem_seg.data != 255).sum()) for s in batch["data_samples"])
    assert set(whole.confusion) == {"p", "p_p", "p_y"}
    for name, conf in whole.confusion.items():
        assert int(conf.sum()) == labelled
        assert torch.equal(conf, sum(r.confusion[name] for r in per_image)), name
    assert torch.equal(whole.changes, sum(r.changes for r in per_image))


def test_evaluation_counts_each_ddp_val_image_once(cac_model, monkeypatch):
    """mmengine's DefaultSampler pads 5 val images to 6 over 2 ranks (rank 1 gets image 0 again); each
    rank counting its real share gives, summed, the counts of every image once."""
    import mmengine.dataset.sampler
    from mmengine.dataset import DefaultSampler

    from cac.mmseg.evaluation import evaluate_pass, rank_share

    images = mixed_seg_batch(SHAPES, NUM_CLASSES, seed=7)
    items = [{"inputs": [images["inputs"][i]], "data_samples": [images["data_samples"][i]]} for i in range(5)]
    total = {}
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(mmengine.dataset.sampler, "get_dist_info", lambda r=rank: (r, 2))
        order = list(DefaultSampler(items, shuffle=False))
        shards.append(order)
        result = evaluate_pass(cac_model, [items[i] for i in order], NUM_CLASSES, max_images=rank_share(5, rank, 2))
        for k, v in result.confusion.items():
            total[k] = total.get(k, 0) + v
    assert shards == [[0, 2, 4], [1, 3, 0]]  # the padding really is there
    once = evaluate_pass(cac_model, items, NUM_CLASSES).confusion
    for k in once:
        assert torch.equal(total[k], once[k]), k
    assert [rank_share(5, r, 2) for r in (0, 1)] == [3, 2] and rank_share(4, 3, 4) == 1


# -- tiny layouts shaped like the datasets ---------------------------------------------------------
@pytest.mark.parametrize("name", ["ade20k", "cocostuff", "pascal-context", "cityscapes"])
def test_tiny_layouts_vary_as_the_real_datasets(name, tmp_path):
    from PIL import Image

    from cac.data.real import REAL_DATASETS
    from cac.data.tiny import NUM_LABELS, make_tiny

    root = make_tiny(name, tmp_path, train=6, val=3, size=64)
    layout = REAL_DATASETS[name]
    for split in ("train", "val"):
        spec = layout.splits[split]
        images = sorted((root / spec.img_dir).rglob(f"*{spec.img_suffix}"))
        sizes = [Image.open(p).size for p in images]  # (w, h)
        labels = [np.asarray(Image.open(next((root / spec.ann_dir).rglob(p.name.replace(spec.img_suffix, "") + spec.ann_suffix))))
                  for p in images]
        assert [lab.shape[::-1] for lab in labels] == sizes  # each label its image's size
        if name == "cityscapes":
            assert set(sizes) == {(128, 64)}
            continue
        assert all(a != b for a, b in zip(sizes, sizes[1:]))  # no two consecutive images share a size
        aspects = [w / h for w, h in sizes]
        assert min(aspects) < 1 < max(aspects)  # portrait and landscape
        low, high = NUM_LABELS[name]
        values = set(np.unique(np.concatenate([lab.ravel() for lab in labels])).tolist())
        assert values <= set(range(low, high + 1)) | {255}
        per_image = [len(set(np.unique(lab).tolist()) - {255}) for lab in labels]
        assert max(per_image) <= 9 < high  # a few classes per image: most absent from any one


# -- a failure inside an evaluation never costs the checkpoint that was due ------------------------
HOOK_SPEC = """
title: hook failure
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 8
  train_cfg.val_interval: 4
  default_hooks.checkpoint.interval: 4
rows:
  - {label: "(f)", description: full CAC, cac: true}
"""


@pytest.mark.slow
def test_a_failed_evaluation_keeps_its_checkpoint_and_the_resume_evaluates_that_step(workspace, monkeypatch):
    """The three-classifier evaluation at iteration 4 raises (as a bad val image or an out-of-memory
    would): iter_4.pth is on disk all the same, the run is left resumable, and the rerun starts at 4,
    first evaluating step 4, so the run's curves keep that point."""
    from mlflow.tracking import MlflowClient

    from cac.cli import main
    from cac.mmseg.hooks import TrackingHook

    real = TrackingHook._evaluate_classifiers
    failed = []

    def failing(self, runner, step, final):
        if step == 4 and not failed:
            failed.append(step)
            raise RuntimeError("evaluation failed at 4")
        return real(self, runner, step, final)

    monkeypatch.setattr(TrackingHook, "_evaluate_classifiers", failing)
    spec = workspace / "hookfail.yaml"
    spec.write_text(HOOK_SPEC)
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="evaluation failed at 4"):
        main(["run", str(spec), "--preset", "quick", "--tracking-uri", uri])
    (ckpt,) = list((workspace / "work_dirs").rglob("iter_4.pth"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hookfail").experiment_id])
    assert run.info.status == "KILLED"
    assert main(["run", str(spec), "--preset", "quick", "--tracking-uri", uri]) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    history = {m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU_pp")}
    assert history == {4, 8}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resume/start_iter")] == [4.0]


@pytest.mark.parametrize("kind", ["gmmseg", "protoseg"])
def test_other_classifiers_evaluate_mixed_sizes_as_each_image_alone_and_keep_their_state(kind):
    """GMMSeg and ProtoSeg on the same mixed-size batch: counts equal the per-image sums (ProtoSeg's
    official embedding is normalised along each image's width, so an image padded or batched with
    another would change), and evaluating writes nothing into the classifier's state."""
    from cac.mmseg.config import resolve_config
    from cac.mmseg.evaluation import evaluate_pass
    from cac.mmseg.params import build_model

    torch.manual_seed(0)
    classifier = {"type": kind, **({"mem_size": 64} if kind == "gmmseg" else {})}
    model = build_model(resolve_config("fcn-slim-r18", "quick", classifier=classifier)["model"]).eval()
    state = {k: v.clone() for k, v in model.decode_head.classifier.named_buffers()}
    batch = mixed_seg_batch(SHAPES, NUM_CLASSES, seed=3)
    whole = evaluate_pass(model, [batch], NUM_CLASSES, explain=True)
    singles = [{"inputs": [batch["inputs"][i]], "data_samples": [batch["data_samples"][i]]} for i in range(len(SHAPES))]
    per_image = [evaluate_pass(model, [one], NUM_CLASSES) for one in singles]
    labelled = sum(int((s.gt_sem_seg.data != 255).sum()) for s in batch["data_samples"])
    assert set(whole.confusion) == {"p"}
    assert int(whole.confusion["p"].sum()) == labelled
    assert torch.equal(whole.confusion["p"], sum(r.confusion["p"] for r in per_image))
    for name, value in model.decode_head.classifier.named_buffers():
        assert torch.equal(value, state[name]), f"evaluation changed {name}"
