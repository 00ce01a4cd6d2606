"""dpt_lightning: prompt learning for biomedical vision-language models with PyTorch Lightning."""
from dpt_lightning.backbone import BIOMEDCLIP_HUB_ID, BiomedCLIP
from dpt_lightning.data import *  # noqa: F401,F403
from dpt_lightning.data import __all__ as _data_all
from dpt_lightning.methods import *  # noqa: F401,F403
from dpt_lightning.methods import __all__ as _methods_all

__version__ = "0.1.0"
__all__ = ["BIOMEDCLIP_HUB_ID", "BiomedCLIP", *_data_all, *_methods_all]
