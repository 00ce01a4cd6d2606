"""The demos' data modules: the synthetic pictures of `dpt_lightning.demo.pictures`, read from
their cached folders like any user's image folder (single-label) or CSV (multi-label)."""
from __future__ import annotations

from dpt_lightning.data.folder import CSVDataModule, ImageFolderDataModule
from dpt_lightning.demo.pictures import demo_dataset_dir, demo_multilabel_dir


class DemoDataModule(ImageFolderDataModule):
    """The synthetic demo data (``root`` is generated when not given)."""

    dataset_name = "demo"

    def __init__(self, root: str | None = None, per_class: int = 40, **kwargs):
        super().__init__(root=root or str(demo_dataset_dir(per_class)), **kwargs)


class DemoMultiLabelDataModule(CSVDataModule):
    """The synthetic multi-label demo: ``num_images`` pictures with any of the four demo shapes
    (circle, square, stripes, cross; none in about one picture in ten), read from their generated
    ``labels.csv`` (a ``labels`` column) as any multi-label CSV: split 50/20/30 with ``split_seed``."""

    dataset_name = "demo_multilabel"

    def __init__(self, csv: str | None = None, num_images: int = 240, **kwargs):
        super().__init__(csv=csv or str(demo_multilabel_dir(num_images) / "labels.csv"), **kwargs)
