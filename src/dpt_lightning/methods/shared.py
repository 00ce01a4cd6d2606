"""Helpers several methods share: per-dataset settings, the teacher's sentences from a bank, the
distillation KL, and settings recorded in the hyper-parameters.

The reference configurations tune some settings per dataset and protocol (loss weights, thresholds,
temperatures). A method keeps its table ``{dataset: {protocol: (value, ...)}}`` beside its code and
calls `resolve_settings`: a value the user gives wins, else the dataset's row, else the method's
documented default; the values used are written into the hyper-parameters (`record_hparams`).
"""
from __future__ import annotations

import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dpt_lightning.data.facts import dataset_facts
from dpt_lightning.descriptions import resolve_sentences
from dpt_lightning.recipe import PROTOCOLS

#: The synthetic demo has no clinical vocabulary: methods that take a dataset's clinical template
#: use the generic prompt there.
DEMO_TEMPLATE = "a photo of a {}."


def dataset_setting(table: dict[str, dict[str, tuple]], dataset: str | None, protocol: str) -> tuple | None:
    """The row of a per-dataset table for ``(dataset, protocol)`` (dataset name matched without
    case), or ``None`` when the table has none (unknown dataset or protocol not covered)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"model.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if dataset is None:
        return None
    for name, rows in table.items():
        if name.lower() == dataset.lower():
            return rows.get(protocol)
    return None


def resolve_settings(given: dict[str, float | None], table: dict[str, dict[str, tuple]], default: tuple,
                     dataset: str | None, protocol: str, method: str) -> dict[str, float]:
    """Method settings (loss weights, thresholds) by name: those given, else the per-dataset
    table's row (values in the order of ``given``), else ``default``; never negative."""
    row = dataset_setting(table, dataset, protocol)
    if row is None and any(v is None for v in given.values()):
        rank_zero_info(f"{method}: no per-dataset settings for dataset {dataset!r} ({protocol}); the documented "
                       f"defaults {dict(zip(given, default))} fill in those not given")
    source = default if row is None else row
    values = {name: float(source[i] if value is None else value) for i, (name, value) in enumerate(given.items())}
    negative = {name: value for name, value in values.items() if value < 0}
    if negative:
        raise ValueError(f"{method}: these settings must be >= 0, got " +
                         ", ".join(f"model.{name}={value}" for name, value in negative.items()))
    return values


def record_hparams(module: LightningModule, **values) -> None:
    """Store settings resolved at construction (from the dataset) in the module's hyper-parameters,
    so that hparams.yaml and checkpoints show the values actually used. Uses the public
    ``save_hyperparameters`` so that it also works under LightningCLI (which supplies its config)."""
    module.save_hyperparameters({**module.hparams, **values})


def clinical_template(template: str | None, dataset: str | None, method: str) -> str:
    """The given template, else the dataset's clinical template (datasets.md); a clear error for
    data without a known template."""
    if template is not None:
        return template
    if dataset is None:
        raise ValueError(f"{method} needs model.template for your own data: a clinical prompt with {{}} for "
                         "the class name, e.g. 'a CT photo of a {} in the kidney.' (its words before {} "
                         "initialise the learnable context)")
    if dataset.lower() == "demo":
        return DEMO_TEMPLATE
    try:
        return dataset_facts(dataset).template
    except KeyError:
        raise ValueError(f"{method} knows no clinical template for dataset {dataset!r}; set model.template "
                         "(e.g. 'a CT photo of a {} in the kidney.')") from None


def teacher_sentences(descriptions: str, dataset: str | None, classnames: list[str],
                      n_prompts: int | None = None) -> list[list[str]]:
    """Each class's first ``n_prompts`` sentences of the bank: the reference codes' rule for their
    teachers. ``None`` = the smallest count of any class (every class then contributes equally
    many; 50 for the shipped banks). A count some class cannot give is an error naming it."""
    sentences = resolve_sentences(descriptions, dataset, classnames)
    fewest = min(len(group) for group in sentences)
    count = fewest if n_prompts is None else n_prompts
    if not 1 <= count <= fewest:
        short = [name for name, group in zip(classnames, sentences) if len(group) < count]
        raise ValueError(f"model.n_prompts={count}: every class needs that many sentences; fewer in {short}")
    return [group[:count] for group in sentences]


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(softmax(teacher) || softmax(student))`` summed over batch and classes, divided by
    ``B * C``: the reference code's normalisation (not ``batchmean``)."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="sum", log_target=True) / student_logits.numel()
