"""GMMSeg and ProtoSeg here against their official code, run from a copy the user points to.

    python benchmarks/official_classifiers.py --gmmseg PATH --protoseg PATH [--steps 12]

``PATH`` is a checkout (or a bare git directory, read at HEAD) of leonnnop/GMMSeg and of tfzhou/ProtoSeg.
This executes the official files named below (third-party code: only on your explicit request, which
giving a path is); nothing of them is stored in this repository. Their own imports of mmcv 1.x,
mmseg 0.x, timm, einops and their training framework are replaced by small stand-ins written here (an
mmseg-0.x-style ``BaseDecodeHead`` with its ``losses``, a registry, ``einops``'s three patterns, a
backbone that hands over given features); everything the methods compute is the official code's:

- GMMSeg: ``GMMSegHead`` (``mmseg/models/decode_heads/gmmseg_head.py``: ``forward``, ``forward_train``,
  ``compute_log_prob``, ``online_contrast``, ``_dequeue_and_enqueue_k``, ``update_GMM``) with
  ``mmseg/utils/GMMSeg.py`` and ``mmseg/utils/distributions/multivariate_normal_diag.py``;
- ProtoSeg: ``HRNet_W48_Proto`` (``lib/models/nets/hrnet.py``: ``forward``, ``prototype_learning``) with
  ``lib/models/modules/{contrast,sinkhorn}.py`` and ``lib/loss/loss_proto.py`` (PPC, PPD, their sum).

Both sides get the same weights, state and inputs in float64, train for ``--steps`` steps (new features
each step, a small memory that wraps, EM every other step), once with ordinary features and once with
confident ones (each pixel at its class's first component), and the script prints the largest absolute
difference of every loss term, the logits, the component targets, the state after each step (GMMSeg's
means, σ, memory and pointers; ProtoSeg's prototypes) and the gradients of the inputs and of every
trained parameter. ProtoSeg's update samples a Gumbel-softmax: both sides draw from the same seed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def source(repo: Path, rel: str) -> str:
    """A file of the official repository: from its work tree, or a bare git directory at HEAD."""
    if (repo / rel).is_file():
        return (repo / rel).read_text()
    return subprocess.run(["git", f"--git-dir={repo}", "show", f"HEAD:{rel}"], capture_output=True, text=True,
                          check=True).stdout


def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def exec_module(name: str, text: str) -> types.ModuleType:
    mod = module(name)
    exec(compile(text, name, "exec"), mod.__dict__)
    return mod


# -- stand-ins for the official code's own dependencies -------------------------------------------
def rearrange(x, pattern: str, **sizes):
    """The three einops patterns the official files use."""
    if pattern == "b c h w -> (b h w) c":
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if pattern == "(b h w) k -> b k h w":
        b, h = sizes["b"], sizes["h"]
        return x.reshape(b, h, -1, x.shape[-1]).permute(0, 3, 1, 2)
    raise NotImplementedError(pattern)


def repeat(x, pattern: str, tile: int):
    assert pattern == "n -> n tile"
    return x.unsqueeze(1).expand(-1, tile)


class Registry:
    def register_module(self, *args, **kwargs):
        return (lambda cls: cls) if not args or not isinstance(args[0], type) else args[0]


class DecodeHead0x(nn.Module):
    """mmseg 0.x's BaseDecodeHead as far as GMMSegHead uses it: its arguments, and ``losses`` (logits
    resized bilinearly, align_corners False, to the labels; CE with ignore 255, mean over all pixels)."""

    def __init__(self, **kw):
        super().__init__()
        self.channels, self.num_classes = kw["channels"], kw["num_classes"]
        self.norm_cfg, self.align_corners = kw.get("norm_cfg"), kw.get("align_corners", False)

    def losses(self, seg_logit, seg_label):
        logit = F.interpolate(seg_logit, size=seg_label.shape[2:], mode="bilinear", align_corners=self.align_corners)
        return {"loss_ce": F.cross_entropy(logit, seg_label.squeeze(1), ignore_index=255, reduction="none").mean()}


def resize(input, size=None, mode="nearest", align_corners=None, **_):
    return F.interpolate(input, size=size, mode=mode, align_corners=align_corners)


def install_stand_ins() -> None:
    module("einops", rearrange=rearrange, repeat=repeat)
    module("timm")
    module("timm.models")
    module("timm.models.layers", trunc_normal_=lambda t, std=1.0: nn.init.trunc_normal_(t, std=std, a=-2, b=2))
    module("mmcv")
    module("mmcv.cnn", ConvModule=None)
    module("mmseg")
    module("mmseg.models")
    module("mmseg.models.builder", HEADS=Registry())
    module("mmseg.models.decode_heads")
    module("mmseg.models.decode_heads.decode_head", BaseDecodeHead=DecodeHead0x)
    module("mmseg.ops", resize=resize)
    module("mmseg.utils")
    module("mmseg.utils.distributed", concat_all_gather_wo_grad=lambda t: t)  # one process: the gather is t


def diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


class Report:
    def __init__(self) -> None:
        self.worst: dict[str, float] = {}

    def add(self, name: str, a, b) -> None:
        self.worst[name] = max(self.worst.get(name, 0.0), diff(a, b))

    def print(self, title: str) -> float:
        print(title)
        for name, value in self.worst.items():
            print(f"  {name:<34} {value:.3g}")
        return max(self.worst.values())


def labels_for(gen, b, h, w, classes, scale=4):
    """Labels at 4x the features' size: a few classes per image, some absent, an ignored band."""
    lab = torch.randint(0, classes, (b, h, w), generator=gen)
    lab[:, : h // 4] = lab[:, : h // 4] % 3  # a majority of the first classes
    lab = lab.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    lab[:, :, :scale] = 255
    return lab


# -- GMMSeg ----------------------------------------------------------------------------------------
def check_gmmseg(repo: Path, steps: int, confident: bool) -> float:
    from cac.core.gmmseg import GMMSegClassifier, GMMSegOptions

    install_stand_ins()
    exec_module("mmseg.utils.distributions", source(repo, "mmseg/utils/distributions/multivariate_normal_diag.py"))
    exec_module("mmseg.utils.GMMSeg", source(repo, "mmseg/utils/GMMSeg.py"))
    head_mod = exec_module("gmmseg_head", source(repo, "mmseg/models/decode_heads/gmmseg_head.py"))

    class Official(head_mod.GMMSegHead):
        def base_feature_transform(self, inputs):
            return inputs  # the features after the projection, as the comparison hands them over

    c, p, d, k = 6, 3, 8, 37
    torch.manual_seed(0)
    ours = GMMSegClassifier(d, c, GMMSegOptions(embed_dim=d, num_components=p, mem_size=k, max_sample_size=3,
                                                update_interval=2)).double().train()
    params = dict(embed_dim=d, num_components=p, update_GMM_interval=2, gamma=[0.999, 0], factor_n=2, factor_c=1,
                  factor_p=1, mem_size=k, max_sample_size=3)
    official = Official(channels=d, num_classes=c, in_channels=d, decoder_params=params).double().train()
    with torch.no_grad():
        for name in ("feat_norm", "mask_norm"):
            for attr in ("weight", "bias"):
                value = torch.randn_like(getattr(getattr(ours, name), attr)) * 0.2 + (1.0 if attr == "weight" else 0.0)
                getattr(getattr(ours, name), attr).copy_(value)
                getattr(getattr(official, name), attr).data.copy_(value)
        if confident:  # zero-mean directions: an input at a mean is that mean after the LayerNorm
            ours.means.copy_(F.normalize(ours.means - ours.means.mean(-1, keepdim=True), dim=-1))
            ours.feat_norm.weight.fill_(1.0), ours.feat_norm.bias.zero_()
            official.feat_norm.weight.data.fill_(1.0), official.feat_norm.bias.data.zero_()
        official.means.data.copy_(ours.means)
        official.diagonal.data.copy_(ours.sigma)
        official.queue.copy_(ours.queue)
        official.queue_ptr.copy_(ours.queue_ptr)
    report = Report()
    gen = torch.Generator().manual_seed(1)
    train_cfg = {"contrast_loss": True, "contrast_loss_weight": 0.01}
    for step in range(steps):
        b, h, w = 2, 6, 7
        labels = labels_for(gen, b, h, w, c)
        small = labels[:, ::4, ::4]
        if confident:
            comp = ours.means[small.clamp(max=c - 1), 0].permute(0, 3, 1, 2)  # each pixel at its class's first mean
            feats = comp * 3.0 + 0.01 * torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
        else:
            feats = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
        x1, x2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        seen = {}
        real_forward = official.forward

        def recorded(*args, **kwargs):
            seen["out"] = real_forward(*args, **kwargs)
            return seen["out"]

        official.forward = recorded
        theirs = official.forward_train(x1, None, labels.unsqueeze(1), train_cfg)
        del official.forward
        out = ours(x2, labels=labels)
        mine = ours.losses(out, labels, lambda logits, _acc: DecodeHead0x(channels=d, num_classes=c).losses(
            logits, labels.unsqueeze(1)))
        seg, contrast_logits, contrast_target = seen["out"]
        report.add("logits (test output)", out.p, seg)
        report.add("component log-densities", out.components, contrast_logits)
        report.add("component targets", out.targets.double(), contrast_target)
        report.add("loss_ce", mine["loss_ce"], theirs["loss_ce"])
        report.add("loss_contrast", mine["loss_contrast"], theirs["loss_contrast"])
        g1 = torch.autograd.grad(sum(theirs.values()), [x1] + [official.feat_norm.weight, official.feat_norm.bias,
                                                               official.mask_norm.weight, official.mask_norm.bias])
        g2 = torch.autograd.grad(sum(mine.values()), [x2] + [ours.feat_norm.weight, ours.feat_norm.bias,
                                                             ours.mask_norm.weight, ours.mask_norm.bias])
        for name, a, bb in zip(("grad features", "grad feat_norm.weight", "grad feat_norm.bias",
                                "grad mask_norm.weight", "grad mask_norm.bias"), g2, g1):
            report.add(name, a, bb)
        report.add("state means", ours.means, official.means)
        report.add("state sigma", ours.sigma, official.diagonal)
        report.add("state memory", ours.queue, official.queue)
        report.add("state memory pointers", ours.queue_ptr, official.queue_ptr)
        report.add("state step", ours.step.double(), official.iteration_counter.reshape(()))
    kind = "confident" if confident else "ordinary"
    return report.print(f"GMMSeg, {steps} steps, {kind} features (largest |ours - official|):")


# -- ProtoSeg --------------------------------------------------------------------------------------
class Configer:
    def __init__(self, values: dict) -> None:
        self.values = values

    def get(self, *keys):
        node = self.values
        for key in keys:
            node = node[key]
        return node

    def exists(self, *keys) -> bool:
        try:
            self.get(*keys)
            return True
        except KeyError:
            return False


def check_protoseg(repo: Path, steps: int, confident: bool) -> float:
    from cac.core.protoseg import ProtoSegClassifier, ProtoSegOptions

    install_stand_ins()
    width = 720  # the official network's hard-coded feature width

    class Backbone(nn.Module):  # hands the given features over as HRNet's four branches (one size)
        def forward(self, x):
            return [x[:, :48], x[:, 48:144], x[:, 144:336], x[:, 336:]]

    class Selector:
        def __init__(self, configer):
            pass

        def get_backbone(self):
            return Backbone()

    class Helper:
        @staticmethod
        def BNReLU(channels, bn_type=None):
            return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())

    class Log:
        info = staticmethod(lambda *a, **k: None)

    module("lib")
    module("lib.models")
    module("lib.models.backbones")
    module("lib.models.backbones.backbone_selector", BackboneSelector=Selector)
    module("lib.models.tools")
    module("lib.models.tools.module_helper", ModuleHelper=Helper)
    module("lib.models.modules")
    module("lib.models.modules.projection", ProjectionHead=None)
    module("lib.models.modules.hanet_attention", HANet_Conv=None)
    module("lib.utils")
    module("lib.utils.tools")
    module("lib.utils.tools.logger", Logger=Log)
    exec_module("lib.models.modules.contrast", source(repo, "lib/models/modules/contrast.py"))
    exec_module("lib.models.modules.sinkhorn", source(repo, "lib/models/modules/sinkhorn.py"))
    module("lib.loss")
    module("lib.loss.loss_helper", FSAuxCELoss=None, FSAuxRMILoss=None,
           FSCELoss=lambda configer: nn.CrossEntropyLoss(ignore_index=-1))  # unweighted, mean over labelled pixels
    nets = exec_module("lib.models.nets.hrnet", source(repo, "lib/models/nets/hrnet.py"))
    losses = exec_module("lib.loss.loss_proto", source(repo, "lib/loss/loss_proto.py"))

    c, m = 5, 4
    values = {"protoseg": {"gamma": 0.999, "num_prototype": m, "use_prototype": True, "update_prototype": True,
                           "pretrain_prototype": False, "loss_ppc_weight": 0.01, "loss_ppd_weight": 0.001,
                           "use_rmi": False},
              "data": {"num_classes": c}, "network": {"bn_type": "torchbn"},
              "loss": {"params": {"ce_ignore_index": -1}}}
    configer = Configer(values)
    torch.manual_seed(0)
    official = nets.HRNet_W48_Proto(configer).double().train()
    official.cls_head = nn.Identity()  # the head's own feature path: the comparison hands its output over
    criterion = losses.PixelPrototypeCELoss(configer)
    ours = ProtoSegClassifier(width, c, ProtoSegOptions(num_prototypes=m)).double().train()
    with torch.no_grad():
        for mine, theirs in ((ours.proj[0], official.proj_head.proj[0]), (ours.proj[2], official.proj_head.proj[2])):
            theirs.weight.copy_(mine.weight), theirs.bias.copy_(mine.bias)
        for name in ("feat_norm", "mask_norm"):
            for attr in ("weight", "bias"):
                value = torch.randn_like(getattr(getattr(ours, name), attr)) * 0.2 + (1.0 if attr == "weight" else 0.0)
                getattr(getattr(ours, name), attr).copy_(value)
                getattr(getattr(official, name), attr).copy_(value)
        official.prototypes.data.copy_(ours.prototypes)
    report = Report()
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        b, h, w = 2, 5, 6
        labels = labels_for(gen, b, h, w, c)
        feats = torch.randn(b, width, h, w, generator=gen, dtype=torch.float64)
        if confident:  # large, aligned features: cosines near the extremes, the plan near one-hot
            feats = feats * 0.05 + 4.0 * torch.randn(1, width, 1, 1, generator=gen, dtype=torch.float64)
        x1, x2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        official_labels = torch.where(labels == 255, torch.full_like(labels, -1), labels)
        torch.manual_seed(100 + step)  # the Gumbel draws of the update, the same on both sides
        preds = official(x1, gt_semantic_seg=official_labels.unsqueeze(1))
        torch.manual_seed(100 + step)
        out = ours(x2, labels=labels)
        theirs_total = criterion(preds, official_labels)
        ppc = criterion.ppc_criterion(preds["logits"], preds["target"])
        ppd = criterion.ppd_criterion(preds["logits"], preds["target"])
        ce = theirs_total - 0.01 * ppc - 0.001 * ppd
        mine = ours.losses(out, labels, lambda logits, _acc: {"loss_ce": F.cross_entropy(logits, labels, ignore_index=255)})
        targets = torch.where(out.valid, out.targets, torch.full_like(out.targets, -1))
        report.add("logits (test output)", out.p, preds["seg"])
        report.add("prototype cosines", out.components, preds["logits"])
        report.add("prototype targets", targets.double(), preds["target"])
        report.add("loss_ce", mine["loss_ce"], ce)
        report.add("loss_ppc", mine["loss_ppc"], 0.01 * ppc)
        report.add("loss_ppd", mine["loss_ppd"], 0.001 * ppd)
        report.add("total", sum(mine.values()), theirs_total)
        trained = ["proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "feat_norm.weight",
                   "feat_norm.bias", "mask_norm.weight", "mask_norm.bias"]
        official_names = {n.replace("proj_head.proj.", "proj."): t for n, t in official.named_parameters()}
        g1 = torch.autograd.grad(theirs_total, [x1] + [official_names[n] for n in trained])
        g2 = torch.autograd.grad(sum(mine.values()), [x2] + [dict(ours.named_parameters())[n] for n in trained])
        for name, a, bb in zip(["features"] + trained, g2, g1):
            report.add(f"grad {name}", a, bb)
        report.add("state prototypes", ours.prototypes, official.prototypes)
    kind = "confident" if confident else "ordinary"
    return report.print(f"ProtoSeg, {steps} steps, {kind} features (largest |ours - official|):")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gmmseg", type=Path, help="a checkout (or bare git dir) of leonnnop/GMMSeg")
    ap.add_argument("--protoseg", type=Path, help="a checkout (or bare git dir) of tfzhou/ProtoSeg")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args(argv)
    if not (args.gmmseg or args.protoseg):
        ap.error("give --gmmseg and/or --protoseg")
    worst = 0.0
    for confident in (False, True):
        if args.gmmseg:
            worst = max(worst, check_gmmseg(args.gmmseg, args.steps, confident))
        if args.protoseg:
            worst = max(worst, check_protoseg(args.protoseg, args.steps, confident))
    print(f"largest difference overall: {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
