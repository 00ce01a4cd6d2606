"""Zero-shot BiomedCLIP: one template, or an ensemble of sentences per class."""
from __future__ import annotations

from torch import Tensor

from dpt_lightning.methods.base import PromptTrainer


class ZeroShot(PromptTrainer):
    """Class features from ``template`` or, with ``descriptions``, from the ensemble of each
    class's sentences (normalised, averaged, re-normalised). Nothing trains: validate, test and
    predict only.

    Args:
        template: prompt template, ``{}`` is the class name.
        descriptions: a description bank (JSON path, or ``auto`` for the dataset's shipped bank).
    """

    learns = False

    def __init__(self, template: str = "a photo of a {}.", descriptions: str | None = None, **kwargs):
        super().__init__(**kwargs)

    def configure_prompts(self) -> None:
        features = self.frozen_class_features(self.hparams.template, self.hparams.descriptions)
        self.register_buffer("class_features", features, persistent=False)

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return self.class_features
