"""mmseg dataset for the generated context-scenes benchmark (registered on import)."""
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from cac.data.context_scenes import CLASSES, PALETTE

__all__ = ["ContextScenesDataset"]


@DATASETS.register_module()
class ContextScenesDataset(BaseSegDataset):
    """context-scenes in mmseg's layout: ``images/<split>/NNNNN.png`` with
    ``annotations/<split>/NNNNN.png`` (class ids 0..N-1, 255 = ignore, so no zero-label reduction)."""

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(self, img_suffix: str = ".png", seg_map_suffix: str = ".png",
                 reduce_zero_label: bool = False, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)
