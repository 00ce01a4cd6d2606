"""DataModules: the base, the 11 benchmark datasets, the multi-label chest X-ray datasets, the
user's own data and the synthetic demos.

Modules: ``splits`` (items, few-shot selection, base/novel labels, THE split builder, split files),
``dataset`` (dataset and epoch-seeded sampler), ``checks`` (problems of a split, the class rule),
``images`` (reading any image as RGB), ``dicom`` (DICOM files), ``errors``
(`DataError`), ``datamodule`` (`MedicalDataModule`), ``benchmarks``, ``chest`` (ChestX-ray14,
CheXpert), ``folder`` (image folder, CSV), ``tables`` (CSV files), ``multilabel`` (multi-label
tables), ``demo``, ``facts``; for ``dpt-data``: ``catalogue`` (where each dataset comes from, its
published counts), ``archives`` (safe unpacking into the layout), ``download`` (resumable, verified
hub downloads), ``audit`` (the check report). The reference transforms live in `dpt_lightning.recipe`.
"""
from dpt_lightning.data.benchmarks import (BENCHMARK_DATAMODULES, BenchmarkDataModule, BTMRIDataModule,
                                           BUSIDataModule, CHMNISTDataModule, COVID19DataModule,
                                           CTKidneyDataModule, DermaMNISTDataModule, KneeXrayDataModule,
                                           KvasirDataModule, LungColonDataModule, OCTMNISTDataModule,
                                           RETINADataModule, benchmark_datamodule)
from dpt_lightning.data.chest import CheXpertDataModule, ChestXray14DataModule
from dpt_lightning.data.datamodule import MedicalDataModule
from dpt_lightning.data.dataset import IGNORE
from dpt_lightning.data.demo import DemoDataModule, DemoMultiLabelDataModule
from dpt_lightning.data.errors import DataError
from dpt_lightning.data.folder import CSVDataModule, ImageFolderDataModule, read_label_csv
from dpt_lightning.data.splits import (Item, MultiLabelItem, build_split, read_split_file, sample_few_shot,
                                       sample_few_shot_multilabel, select_few_shot, write_split_file)

__all__ = ["CSVDataModule", "DataError", "DemoDataModule", "ImageFolderDataModule", "Item",
           "MedicalDataModule", "read_split_file", "sample_few_shot"]
__all__ += ["BENCHMARK_DATAMODULES", "BenchmarkDataModule", "BTMRIDataModule", "BUSIDataModule",
            "CHMNISTDataModule", "COVID19DataModule", "CTKidneyDataModule", "DermaMNISTDataModule",
            "KneeXrayDataModule", "KvasirDataModule", "LungColonDataModule", "OCTMNISTDataModule",
            "RETINADataModule", "benchmark_datamodule", "select_few_shot", "write_split_file"]
__all__ += ["build_split", "read_label_csv"]
__all__ += ["CheXpertDataModule", "ChestXray14DataModule", "DemoMultiLabelDataModule", "IGNORE", "MultiLabelItem",
            "sample_few_shot_multilabel"]
