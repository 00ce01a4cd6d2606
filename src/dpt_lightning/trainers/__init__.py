"""Prompt-learning methods as LightningModules on one shared frozen backbone."""
from dpt_lightning.trainers.base import CheckpointMismatchError, PromptTrainer
from dpt_lightning.trainers.coop import CoOp
from dpt_lightning.trainers.zeroshot import ZeroShot

__all__ = ["CheckpointMismatchError", "CoOp", "PromptTrainer", "ZeroShot"]
