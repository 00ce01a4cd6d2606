"""Prompt-learning methods as LightningModules on one shared frozen backbone."""
from dpt_lightning.trainers.base import CheckpointMismatchError, PromptTrainer
from dpt_lightning.trainers.biomed_coop import BiomedCoOp
from dpt_lightning.trainers.biomed_dpt import BiomedDPT
from dpt_lightning.trainers.coop import CoOp
from dpt_lightning.trainers.maple import MaPLe
from dpt_lightning.trainers.vpt import VPT
from dpt_lightning.trainers.zeroshot import ZeroShot

__all__ = ["BiomedCoOp", "BiomedDPT", "CheckpointMismatchError", "CoOp", "MaPLe", "PromptTrainer", "VPT", "ZeroShot"]
