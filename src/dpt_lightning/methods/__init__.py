"""Prompt-learning methods as LightningModules on one shared frozen backbone."""
from dpt_lightning.methods.base import PromptTrainer
from dpt_lightning.methods.biomed_coop import BiomedCoOp
from dpt_lightning.methods.biomed_dpt import BiomedDPT
from dpt_lightning.methods.checkpoints import CheckpointMismatchError
from dpt_lightning.methods.clip_adapter import CLIPAdapter
from dpt_lightning.methods.clip_svd import CLIPSVD
from dpt_lightning.methods.cocoop import CoCoOp
from dpt_lightning.methods.coop import CoOp
from dpt_lightning.methods.kgcoop import KgCoOp
from dpt_lightning.methods.linear_probe import LinearProbe
from dpt_lightning.methods.lp_plus_plus import LPPlusPlus
from dpt_lightning.methods.maple import MaPLe
from dpt_lightning.methods.prograd import ProGrad
from dpt_lightning.methods.tip_adapter import TipAdapter, TipAdapterF
from dpt_lightning.methods.vpt import VPT
from dpt_lightning.methods.zeroshot import ZeroShot

__all__ = ["BiomedCoOp", "BiomedDPT", "CheckpointMismatchError", "CLIPAdapter", "CLIPSVD", "CoCoOp", "CoOp", "KgCoOp",
           "LinearProbe", "LPPlusPlus", "MaPLe", "ProGrad", "PromptTrainer", "TipAdapter", "TipAdapterF", "VPT",
           "ZeroShot"]
