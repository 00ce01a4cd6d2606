"""Zero-shot BiomedCLIP: one template, or an ensemble of sentences per class."""
from __future__ import annotations

from torch import Tensor

from dpt_lightning.descriptions import load_bank, sentences_for
from dpt_lightning.trainers.base import PromptTrainer


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
        hp = self.hparams
        if hp.descriptions:
            source = hp.dataset if hp.descriptions == "auto" else hp.descriptions
            if source is None:
                raise ValueError("model.descriptions: 'auto' needs a benchmark dataset; pass a JSON bank path")
            sentences = sentences_for(load_bank(source), self.classnames, source)
        else:
            sentences = [[hp.template.format(name)] for name in self.classnames]
        self.register_buffer("class_features", self.backbone.encode_class_sentences(sentences), persistent=False)

    def encode_classes(self) -> Tensor:
        return self.class_features
