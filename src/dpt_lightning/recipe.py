"""The benchmark's shared recipe, in one place: the evaluation protocols and the reference (Dassl)
image transforms that every backbone, dataset and method uses.

* Protocols: ``fewshot`` (all classes) and ``base2novel`` (train on the base half, test on both).
* Train transform: RandomResizedCrop (scale 0.08-1, the backbone's interpolation, bicubic for the
  BiomedCLIP family), no flip, then normalisation; test: resize of the shorter side, centre crop,
  normalisation. OpenAI CLIP's mean and std are the default normalisation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from torchvision import transforms as T

PROTOCOLS = ("fewshot", "base2novel")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_transforms(image_size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                         interpolation: str = "bicubic") -> tuple[Callable, Callable]:
    """The reference (Dassl) train and test transforms for an image tower of ``image_size``."""
    mode = T.InterpolationMode(interpolation)
    normalize = T.Normalize(tuple(mean), tuple(std))
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=mode),
                       T.ToTensor(), normalize])
    test = T.Compose([T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size), T.ToTensor(), normalize])
    return train, test
