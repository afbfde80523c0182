"""The three-classifier evaluation and the TrackingHook's loss names on a cascade (OCRNet-HR18 + CAC on
its last stage), and CACHead's loss with mmseg's OHEM pixel sampler, on CPU."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cac.mmseg.cfgtree import replace_norm, set_num_classes, strip_pretrained
from cac.mmseg.config import add_cac
from cac.mmseg.evaluation import classifier_logits, evaluate_classifiers, predicted_classes
from cac.mmseg.head import CACHead
from cac.mmseg.hooks import TrackingHook
from cac.mmseg.params import build_model
from cac.mmseg.zoo import get_model, load_base_config
from cac.synthetic import scene_labels, seg_batch

NUM_CLASSES = 6
SIZE = 64


@pytest.fixture(scope="module")
def ocrnet():
    """OCRNet-HR18 (CascadeEncoderDecoder: FCN stage, then OCR stage) with CAC on the OCR stage."""
    model = copy.deepcopy(load_base_config(get_model("ocrnet-hr18")).to_dict()["model"])
    model = strip_pretrained(replace_norm(model, "SyncBN", "BN"))
    set_num_classes(model, NUM_CLASSES)
    model["data_preprocessor"].pop("size", None)  # the batches are already 64x64: pad to /32 only
    model["data_preprocessor"]["size_divisor"] = 32
    torch.manual_seed(0)
    seg = build_model(add_cac(model, {}))
    assert type(seg).__name__ == "CascadeEncoderDecoder" and isinstance(seg.decode_head[-1], CACHead)
    return seg.eval()


def _batches() -> list[dict]:
    """Two loader-style batches (uint8 images, scene-like labels with ignored pixels)."""
    return [seg_batch(SIZE, 2, NUM_CLASSES, per_image=4, block=8, seed=s) for s in (0, 1)]


def _confusion(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Rows = ground truth, columns = prediction, 255 skipped: counted pixel by pixel with numpy."""
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    keep = gt != 255
    np.add.at(conf, (gt[keep], pred[keep]), 1)
    return conf


def _literal_p_y(cac: CACHead, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_y written out: C_y[b, k] = the mean of image b's features over its class-k pixels (Eq. 1,
    labels nearest-resized to the features; absent classes zero), A_y from the head's design and
    projector (Eq. 2), p_y = tau * cos(f, A_y) (Eq. 3)."""
    b, d, h, w = f.shape
    small = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    c_y = torch.zeros(b, NUM_CLASSES, d)
    for i in range(b):
        for k in range(NUM_CLASSES):
            mask = small[i] == k
            if mask.any():
                c_y[i, k] = f[i][:, mask].mean(dim=1)
    weight = cac.head.conv_seg.weight.flatten(1)
    a_y = cac.classifier.form(cac.options.design_y, c_y, weight, cac.classifier.proj_y)  # [B, N, D]
    return cac.options.tau * torch.einsum("bdhw,bnd->bnhw", F.normalize(f, dim=1), F.normalize(a_y, dim=-1))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_predicted_classes_are_argmax_on_ties_nan_and_inf(dtype):
    """Logits of few distinct values (ties everywhere), a NaN channel and two infinite ones: the
    prediction is argmax's (the first maximum; NaN counts as the maximum)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2, 7, 33, 45), generator=g).to(dtype)
    logits[0, 2, 5, 5] = float("nan")
    logits[1, :, 3, 3] = float("nan")
    logits[0, 1, 4, 4] = logits[0, 5, 4, 4] = float("inf")
    assert torch.equal(predicted_classes(logits), logits.argmax(1))
    assert predicted_classes(logits)[0, 5, 5] == 2 and predicted_classes(logits)[0, 4, 4] == 1


def test_cascade_three_classifiers_match_a_direct_computation(ocrnet):
    """p, p_p and p_y of the last (CAC) stage, fed the first stage's output as OCR's prev_output.
    p_p is checked against mmseg's own cascade inference (``model.predict``), p against the stage's
    conv_seg on its features, and the confusion matrices against a numpy count over both batches."""
    assert not ocrnet.training  # as built: no other test left it in train mode
    batches = _batches()
    confs = evaluate_classifiers(ocrnet, batches, NUM_CLASSES)
    assert set(confs) == {"p", "p_p", "p_y"}

    stage0, cac = ocrnet.decode_head
    direct = {k: np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64) for k in confs}
    for batch in batches:
        data = ocrnet.data_preprocessor(batch, False)
        inputs, samples = data["inputs"], data["data_samples"]
        labels = torch.stack([s.gt_sem_seg.data.squeeze(0) for s in samples])
        gt = labels.numpy()
        # the logits classifier_logits returns for the cascade are the CAC stage's, given prev_output
        feats = ocrnet.extract_feat(inputs)
        f = cac.features(feats, stage0.forward(feats))
        conv = cac.head.conv_seg
        logits = classifier_logits(ocrnet, inputs, labels)
        torch.testing.assert_close(logits["p"], F.conv2d(f, conv.weight, conv.bias))
        p_y = _literal_p_y(cac, f, labels)
        torch.testing.assert_close(logits["p_y"], p_y, rtol=1e-4, atol=1e-4)

        def up(x: torch.Tensor) -> np.ndarray:
            return F.interpolate(x, size=gt.shape[-2:], mode="bilinear", align_corners=False).argmax(1).numpy()

        direct["p"] += _confusion(up(F.conv2d(f, conv.weight, conv.bias)), gt)
        direct["p_y"] += _confusion(up(p_y), gt)
        # p_p is what mmseg's CascadeEncoderDecoder predicts at test time
        pred = torch.stack([s.pred_sem_seg.data.squeeze(0) for s in ocrnet.predict(inputs, samples)])
        direct["p_p"] += _confusion(pred.numpy(), gt)

    labelled = sum(int((s.gt_sem_seg.data != 255).sum()) for b in batches for s in b["data_samples"])
    for name, conf in confs.items():
        assert conf.sum() == labelled, name  # every labelled pixel of both batches, once
        np.testing.assert_array_equal(conf.numpy(), direct[name], err_msg=name)
    # the three are different classifiers (p_y sees the labels)
    assert not np.array_equal(direct["p"], direct["p_p"]) and not np.array_equal(direct["p_p"], direct["p_y"])


def test_cascade_loss_terms_logged_under_the_readme_names(ocrnet, tmp_path):
    """The TrackingHook, given OCRNet's real log_vars (``decode_1.loss_kl`` ...), logs the CAC stage's
    terms as ``train/loss_kl`` etc. (as for single-head models) and keeps the first stage's prefixed:
    read back from a real MLflow run."""
    from cac.exp.tracking import RunTracker

    ocrnet = copy.deepcopy(ocrnet).train()  # a train-mode forward updates BN statistics: not the shared model's
    batch = ocrnet.data_preprocessor(seg_batch(SIZE, 2, NUM_CLASSES, per_image=4, block=8, seed=0), True)
    _, log_vars = ocrnet.parse_losses(ocrnet.loss(batch["inputs"], batch["data_samples"]))
    assert "decode_1.loss_kl" in log_vars and "decode_0.loss_ce" in log_vars

    tracker = RunTracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "cascade", {"row": "(x)"}, "cascade")
    runner = SimpleNamespace(iter=0, max_iters=1000, model=ocrnet,  # step 1 of many: no evaluation due
                             optim_wrapper=SimpleNamespace(get_lr=lambda: {"lr": [0.01]}))
    hook = TrackingHook(tracker, interval=0, log_interval=1, progress=False)
    hook.before_train(runner)
    hook.after_train_iter(runner, 0, None, log_vars)
    client = tracker.client
    logged = {k: client.get_metric_history(tracker.run_id, k) for k in client.get_run(tracker.run_id).data.metrics}
    assert {m.step for hist in logged.values() for m in hist} == {1}
    logged = {k: hist[-1].value for k, hist in logged.items()}
    for term in ("loss_ce", "loss_ctx_ce", "loss_oracle_ce", "loss_kl", "acc_seg"):
        assert logged[f"train/{term}"] == pytest.approx(float(log_vars[f"decode_1.{term}"])), term
    assert logged["train/decode_0.loss_ce"] == pytest.approx(float(log_vars["decode_0.loss_ce"]))
    assert logged["train/loss"] == pytest.approx(float(log_vars["loss"]))
    assert not [k for k in logged if k.startswith("train/decode_1.")]


def _ohem_head(min_kept: int) -> CACHead:
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    head = dict(type="FCNHead", in_channels=16, channels=16, num_convs=1, concat_input=False, num_classes=NUM_CLASSES,
                dropout_ratio=0.0, align_corners=False,
                sampler=dict(type="OHEMPixelSampler", thresh=0.7, min_kept=min_kept),
                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
    return MODELS.build(dict(type="CACHead", head=head, cac={}))


def test_ohem_sampler_loss_equals_the_heads_own_loss_by_feat():
    """CACHead.segmentation_loss with an OHEM pixel sampler = the wrapped head's own loss_by_feat on
    the same logits (the sampler drops the easy pixels, so the sampled loss differs from the plain one)."""
    from cac.synthetic import data_samples

    g = torch.Generator().manual_seed(0)
    labels = scene_labels(2, 32, NUM_CLASSES, per_image=4, block=8, generator=g)  # 10% ignored pixels
    coarse = labels[:, ::4, ::4].clone()  # logits at 1/4 of the label size, as a decode head's are
    logits = torch.randn(2, NUM_CLASSES, 8, 8, generator=g)
    easy = (torch.rand(coarse.shape, generator=g) < 0.5) & (coarse != 255)
    logits += 6.0 * (F.one_hot(coarse.clamp_max(NUM_CLASSES - 1), NUM_CLASSES).permute(0, 3, 1, 2)
                     * easy[:, None]).float()  # confident and right on half the cells: OHEM drops those
    samples = data_samples(32, 2, labels)
    seg_label = labels[:, None]

    head = _ohem_head(min_kept=100)
    own = head.head.loss_by_feat(logits, samples)
    for accuracy in (True, False):
        ours = head.segmentation_loss(logits, seg_label, accuracy=accuracy)
        assert set(ours) == ({"loss_ce", "acc_seg"} if accuracy else {"loss_ce"})
        torch.testing.assert_close(ours["loss_ce"], own["loss_ce"], rtol=1e-5, atol=1e-6)
        if accuracy:
            torch.testing.assert_close(ours["acc_seg"], own["acc_seg"])

    plain = _ohem_head(min_kept=100)
    plain.head.sampler = None
    unsampled = plain.segmentation_loss(logits, seg_label, accuracy=False)["loss_ce"]
    assert abs(float(unsampled) - float(own["loss_ce"])) > 0.01  # the sampler really changed the loss
