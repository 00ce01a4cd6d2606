"""DataModules: the base, the 11 benchmark datasets, the user's own data and the synthetic demo."""
from dpt_lightning.data.base import (DataError, Item, MedicalDataModule, read_split_file, sample_few_shot,
                                     select_few_shot, write_split_file)
from dpt_lightning.data.benchmarks import (BENCHMARK_DATAMODULES, BenchmarkDataModule, BTMRIDataModule,
                                           BUSIDataModule, CHMNISTDataModule, COVID19DataModule,
                                           CTKidneyDataModule, DermaMNISTDataModule, KneeXrayDataModule,
                                           KvasirDataModule, LungColonDataModule, OCTMNISTDataModule,
                                           RETINADataModule, benchmark_datamodule)
from dpt_lightning.data.demo import DemoDataModule
from dpt_lightning.data.folder import CSVDataModule, ImageFolderDataModule

__all__ = ["CSVDataModule", "DataError", "DemoDataModule", "ImageFolderDataModule", "Item",
           "MedicalDataModule", "read_split_file", "sample_few_shot"]
__all__ += ["BENCHMARK_DATAMODULES", "BenchmarkDataModule", "BTMRIDataModule", "BUSIDataModule",
            "CHMNISTDataModule", "COVID19DataModule", "CTKidneyDataModule", "DermaMNISTDataModule",
            "KneeXrayDataModule", "KvasirDataModule", "LungColonDataModule", "OCTMNISTDataModule",
            "RETINADataModule", "benchmark_datamodule", "select_few_shot", "write_split_file"]
