"""DataModules: the base, the user's own data and the synthetic demo."""
from dpt_lightning.data.base import DataError, Item, MedicalDataModule, read_split_file, sample_few_shot
from dpt_lightning.data.demo import DemoDataModule
from dpt_lightning.data.folder import CSVDataModule, ImageFolderDataModule

__all__ = ["CSVDataModule", "DataError", "DemoDataModule", "ImageFolderDataModule", "Item",
           "MedicalDataModule", "read_split_file", "sample_few_shot"]
