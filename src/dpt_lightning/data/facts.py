"""Facts of the 11 benchmark datasets (BiomedCoOp benchmark, as used by Biomed-DPT), and of the
multi-label chest X-ray datasets (`MULTILABEL_DATASETS`).

One table, read by the datamodules (folders, class names) and by the methods that need a
dataset's clinical template (Biomed-DPT). Class names are listed in label order.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetFacts:
    name: str  #: the benchmark's folder name (DIR)
    classnames: tuple[str, ...]  #: label order
    modality: str
    organ: str
    template: str  #: Biomed-DPT's clinical template, ``{}`` = class name

    @property
    def key(self) -> str:
        """Lower-case name used for shipped files (description banks, YAML configs)."""
        return self.name.lower()


BENCHMARK_DATASETS: dict[str, DatasetFacts] = {f.name: f for f in [
    DatasetFacts("BTMRI", ("glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"),
                 "MRI", "brain", "a MR photo of a {} in the brain."),
    DatasetFacts("BUSI", ("benign tumor", "malignant tumor", "normal scan"),
                 "ultrasound", "breast", "a ultrasound photo of a {} in the breast."),
    DatasetFacts("CHMNIST", ("adipose tissue", "complex stroma", "debris", "empty background", "immune cells",
                             "normal mucosal glands", "simple stroma", "tumour epithelium"),
                 "histopathology", "colorectal tissue", "a histopathological photo of a {}."),
    DatasetFacts("COVID_19", ("covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"),
                 "chest X-ray", "lung", "a chest X-ray photo of a {} affected by COVID-19 in the lung."),
    DatasetFacts("CTKidney", ("cyst kidney", "kidney stone", "kidney tumor", "normal kidney"),
                 "CT", "kidney", "a CT photo of a {} in the kidney."),
    DatasetFacts("DermaMNIST", ("actinic keratosis", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
                                "melanoma", "melanocytic nevus", "vascular lesion"),
                 "dermatoscopy", "skin", "a dermatoscopy photo of a {} in the skin."),
    DatasetFacts("KneeXray", ("healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis",
                              "moderate osteoarthritis", "severe osteoarthritis"),
                 "X-ray", "knee joint", "a frontal X-ray photo of a {} in the knee joint."),
    DatasetFacts("Kvasir", ("dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum",
                            "normal pylorus", "normal z line", "polyps", "ulcerative colitis"),
                 "endoscopy", "colon", "a endoscopic photo of a {} in the colon."),
    DatasetFacts("LungColon", ("colon adenocarcinoma", "colon benign tissue", "lung adenocarcinoma",
                               "lung benign tissue", "lung squamous cell carcinoma"),
                 "histopathology", "lung and colon", "a histopathological photo of a {}."),
    DatasetFacts("OCTMNIST", ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal oct scan"),
                 "optical coherence tomography", "retina", "a OCT photo of a {}."),
    DatasetFacts("RETINA", ("diabetic retinopathy", "glaucoma", "cataract", "normal retina"),
                 "fundus photography", "retina", "a photo of a {} presented in image."),
]}


#: The multi-label chest X-ray datasets (several findings per image; not part of the 11-dataset
#: benchmark): their findings in label order (CheXpert: the 5 competition findings, its default).
MULTILABEL_DATASETS: dict[str, DatasetFacts] = {f.name: f for f in [
    DatasetFacts("ChestXray14", ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                                 "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                                 "Pleural Thickening", "Hernia"),
                 "chest X-ray", "chest", "a chest X-ray photo showing {}."),
    DatasetFacts("CheXpert", ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"),
                 "chest X-ray", "chest", "a chest X-ray photo showing {}."),
]}


def dataset_facts(name: str) -> DatasetFacts:
    """Facts of a benchmark dataset (or a multi-label one) by its folder name (case-insensitive)."""
    for facts in [*BENCHMARK_DATASETS.values(), *MULTILABEL_DATASETS.values()]:
        if facts.name.lower() == name.lower():
            return facts
    known = sorted([*BENCHMARK_DATASETS, *MULTILABEL_DATASETS])
    raise KeyError(f"unknown benchmark dataset {name!r}; known: {known}")
