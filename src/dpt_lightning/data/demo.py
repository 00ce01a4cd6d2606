"""The demo's data module: the synthetic pictures of `dpt_lightning.demo.pictures`, read from
their cached image folder like any user's image folder."""
from __future__ import annotations

from dpt_lightning.data.folder import ImageFolderDataModule
from dpt_lightning.demo.pictures import demo_dataset_dir


class DemoDataModule(ImageFolderDataModule):
    """The synthetic demo data (``root`` is generated when not given)."""

    dataset_name = "demo"

    def __init__(self, root: str | None = None, per_class: int = 40, **kwargs):
        super().__init__(root=root or str(demo_dataset_dir(per_class)), **kwargs)
