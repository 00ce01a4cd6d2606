"""The reference image transforms (Dassl's, for BiomedCLIP): used until the model hands the
datamodule its backbone's own transforms (`MedicalDataModule.use_transforms`)."""
from __future__ import annotations

from typing import Callable

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_transforms(image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> tuple[Callable, Callable]:
    """The reference (Dassl) train and test transforms for BiomedCLIP."""
    bicubic = T.InterpolationMode.BICUBIC
    normalize = T.Normalize(mean, std)
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
                       T.ToTensor(), normalize])
    test = T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size),
                      T.ToTensor(), normalize])
    return train, test
