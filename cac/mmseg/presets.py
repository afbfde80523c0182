"""Presets: the scale a spec runs at.

``quick`` and ``bench`` train on the generated context-scenes data (CPU, minutes); ``paper`` keeps
the model's shipped mmseg config as it is (its dataset, 160k schedule, pretrained weights, SyncBN),
for GPUs. A preset changes data and schedule, never the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cac.errors import CacError
from cac.mmseg.cfgtree import replace_norm, set_num_classes, strip_pretrained

__all__ = ["Preset", "PRESETS", "get_preset", "register_preset"]


@dataclass(frozen=True)
class Preset:
    name: str
    embedded: bool  # True: generated context-scenes data on CPU; False: the shipped config as is
    data: Optional[str] = None  # context-scenes size (cac.data.context_scenes.PRESETS)
    iters: int = 0
    batch_size: int = 8
    val_interval: int = 0  # also the interval of the three-classifier evaluation (Fig. 4 data)
    lr: float = 0.05
    description: str = ""

    def apply_embedded(self, cfg: dict) -> None:
        """Point a config at the generated data, a CPU-sized schedule, and random init."""
        from cac.data import context_scenes

        root = str(context_scenes.default_root(self.data))
        cfg["model"] = strip_pretrained(replace_norm(cfg["model"], "SyncBN", "BN"))
        set_num_classes(cfg["model"], len(context_scenes.CLASSES))
        pre = cfg["model"].get("data_preprocessor") or {}
        pre.pop("size", None)  # images are already the crop size; pad only to the batch's own size
        pre["size_divisor"] = 32
        cfg["model"]["data_preprocessor"] = pre
        train_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
                          dict(type="RandomFlip", prob=0.5), dict(type="PackSegInputs")]
        test_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]

        def loader(split: str, pipeline: list, shuffle: bool, batch: int) -> dict:
            return dict(
                batch_size=batch, num_workers=0, persistent_workers=False,
                sampler=dict(type="InfiniteSampler" if shuffle else "DefaultSampler", shuffle=shuffle),
                dataset=dict(type="ContextScenesDataset", data_root=root,
                             data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
                             pipeline=pipeline),
            )

        ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # Table 1's m.s. scales, with flips
        tta_pipeline = [dict(type="LoadImageFromFile"), dict(type="TestTimeAug", transforms=[
            [dict(type="Resize", scale_factor=r, keep_ratio=True) for r in ratios],
            [dict(type="RandomFlip", prob=0.0, direction="horizontal"),
             dict(type="RandomFlip", prob=1.0, direction="horizontal")],
            [dict(type="LoadAnnotations")], [dict(type="PackSegInputs")]])]
        cfg.update(
            dataset_type="ContextScenesDataset", data_root=root, crop_size=None, img_ratios=ratios,
            tta_pipeline=tta_pipeline,
            train_pipeline=train_pipeline, test_pipeline=test_pipeline,
            train_dataloader=loader("train", train_pipeline, True, self.batch_size),
            val_dataloader=loader("val", test_pipeline, False, 16),
            test_dataloader=loader("val", test_pipeline, False, 16),
            val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
            test_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
            train_cfg=dict(type="IterBasedTrainLoop", max_iters=self.iters, val_interval=self.val_interval),
            val_cfg=dict(type="ValLoop"), test_cfg=dict(type="TestLoop"),
            optim_wrapper=dict(type="OptimWrapper", clip_grad=None,
                               optimizer=dict(type="SGD", lr=self.lr, momentum=0.9, weight_decay=5e-4)),
            param_scheduler=[dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=self.iters,
                                  by_epoch=False)],
            default_hooks=dict(
                timer=dict(type="IterTimerHook"),
                logger=dict(type="LoggerHook", interval=max(1, min(50, self.iters // 10)), log_metric_by_epoch=False),
                param_scheduler=dict(type="ParamSchedulerHook"),
                checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=self.val_interval, max_keep_ckpts=1,
                                save_last=True),
                sampler_seed=dict(type="DistSamplerSeedHook"),
                visualization=dict(type="SegVisualizationHook", draw=False),
            ),
            env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                         dist_cfg=dict(backend="gloo")),
            log_processor=dict(by_epoch=False),
            tta_model=dict(type="SegTTAModel"),
        )
        cfg.pop("auto_scale_lr", None)


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CacError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


register_preset(Preset("quick", True, data="quick", iters=100, batch_size=8, val_interval=50, lr=0.02,
                       description="CI scale: generated data, 100 iterations, seconds per run on CPU"))
register_preset(Preset("bench", True, data="bench", iters=1600, batch_size=8, val_interval=800, lr=0.02,
                       description="generated data (800 train / 400 val), 1600 iterations, 40-60 s per run "
                                   "on 2 CPU cores"))
register_preset(Preset("paper", False,
                       description="the paper's setting: the model's shipped mmseg config (ADE20K or COCO-Stuff, "
                                   "160k iterations, pretrained backbone) for GPUs"))
