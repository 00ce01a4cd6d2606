"""CLIP-SVD (Koleilat et al., 2025): only the singular values of the frozen towers' weight matrices learn.

Every chosen matrix is factorised once, W = U diag(s0) V^T (thin SVD, float32, as the reference), and
its singular values s become the trainable parameter, starting at s0. The model then computes with

    W(s) = W + U diag(s - s0) V^T            (= U diag(s) V^T, the reference's matrix)

so untouched singular values give the frozen weights themselves, bit for bit, and the weights are
rebuilt for every forward from the parameters. They reach the towers through
``torch.func.functional_call``: for the duration of one call the backbone computes with W(s) in place
of W; its own parameters are never written, and other models sharing the same backbone object see
the plain weights before and after (a backbone object is not meant to be used by two threads at once).
U, V and s0 are non-persistent buffers, recomputed from the frozen weights at construction:
checkpoints hold the singular values s only. At BiomedCLIP size that is 144 SVDs (about a minute on
one CPU core) and 972 MiB of buffers (1.5x the 648 MiB of chosen weights); rebuilding one tower's
matrices costs ~130 GFLOP per call (seconds on a CPU, milliseconds on a GPU). The tiny test model
takes ~0.1 s.

As the reference code (HealthX-Lab/CLIP-SVD @022b1ed, ``train.py``: ``run_biomedical_training``,
``svf_utils/``, ``configs/few_shot`` and ``configs/base2new``) runs BiomedCLIP:
* the matrices: in every transformer block of both towers, the attention's query, key, value and
  output matrices and the MLP's two matrices; the image tower's fused q/k/v matrix is cut into its
  three parts first, each factorised on its own (3 x 4 x 768 + 2 x 768 = 4,608 singular values per
  block, 110,592 for BiomedCLIP's 12 + 12 blocks). Patch embedding, the towers' output projections,
  the BERT pooler, embeddings, norms and biases stay frozen. The blocks are the config's
  ``include_train_layers``: all of them, but blocks 4-11 (``top_middle``) of both towers for CTKidney
  base-to-novel (96 matrices instead of 144, 73,728 singular values; `CLIPSVD_SETTINGS`);
* the text side is the template filled with each class name (``a photo of a {}.``; ``a chest xray of
  {}.`` for COVID_19 few-shot), encoded with the current singular values at every training step;
  loss: cross-entropy with the frozen logit scale, nothing else;
* the whole model is in train mode while training (BERT's dropout on: ``reference_backbone_dropout``);
* AdamW (betas 0.9/0.999, no weight decay) at the dataset's learning rate, batch 32, 100 epochs
  (CTKidney 200; fewer for some base-to-novel datasets, see `CLIPSVD_SETTINGS`);
* the schedule is ``CosineAnnealingLR(T_max=epochs, eta_min=1e-6)`` stepped after every batch, so the
  learning rate follows a cosine of period 2 x epochs *steps*: it reaches eta_min after ``epochs``
  steps and climbs back when a fit has more steps than that (``schedule="reference"``). A single
  cosine over the whole fit is ``schedule="cosine"``;
* training views: RandomResizedCrop (scale 0.08-1, bicubic) and a random horizontal flip (``hflip``);
  its loader keeps the last partial batch (``drop_last=False``; Dassl's loaders of the other methods
  drop it): 72 training images at batch 32 are 3 steps an epoch, not 2 (``drop_last_batch``).

Where this differs from the reference code, by choice:
* the reference replaces every Linear layer of the model by its factors (x -> V^T -> s -> U), also
  the frozen ones, so its untouched model differs from BiomedCLIP by the SVD's rounding; here the
  frozen matrices stay as they are and the chosen ones are rebuilt, which equals the frozen model
  exactly at s = s0 and computes the same function otherwise;
* the reference trains under fp16 autocast and evaluates the class features in fp16; the shipped
  config uses ``precision: 32-true`` (the demo must run on CPU), ``--trainer.precision 16-mixed``
  is the reference's choice on a GPU;
* in the reference's text tower, ``train_mlp`` also switches on the attention output matrix (its
  name contains ``output.dense``); here ``matrices`` selects exactly the matrices named. With the
  reference defaults (all on) both select the same matrices.
The paper describes the same choice of matrices (MHSA and MLP of every layer in both encoders) and
counts 0.04% of the parameters: that is 110,592 over the factorised model, which holds U and V for
every Linear layer; over BiomedCLIP's own parameters it is 0.056%.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call

from dpt_lightning.methods.base import PromptTrainer
from dpt_lightning.methods.frozen_features import view_transform
from dpt_lightning.methods.shared import dataset_setting, record_hparams, resolve_settings
from dpt_lightning.prompts import check_class_texts, fill_template

Tower = Literal["image", "text"]
TOWERS: tuple[str, ...] = ("image", "text")
ROLES: tuple[str, ...] = ("q", "k", "v", "out", "fc1", "fc2")
#: The reference's layer presets (``include_train_layers``) for 12-block towers, as thirds of the depth.
LAYER_PRESETS = ("all", "bottom", "middle", "top", "bottom_middle", "top_middle", "top_bottom")

# ----------------------------------------------------------------------------------------------------
# The one place that knows backbone attribute names (issue 14: a new tower family adds its rows here).
#: Where a tower starts inside the open_clip model: the first attribute that exists. BiomedCLIP keeps
#: its text tower in ``text``; open_clip's own CLIP keeps it at the model's top (``transformer``).
TOWER_ROOTS: dict[str, tuple[str, ...]] = {"image": ("visual",), "text": ("text", "transformer")}
#: The weight matrices of a transformer block (block-relative names) and what they are. A matrix
#: that holds q, k and v stacked by rows lists three roles: it is cut into three equal parts.
MATRIX_ROLES: dict[str, tuple[str, ...]] = {
    # timm VisionTransformer Block (BiomedCLIP's image tower)
    "attn.qkv.weight": ("q", "k", "v"), "attn.proj.weight": ("out",),
    "mlp.fc1.weight": ("fc1",), "mlp.fc2.weight": ("fc2",),
    # Hugging Face BertLayer (BiomedCLIP's text tower)
    "attention.self.query.weight": ("q",), "attention.self.key.weight": ("k",),
    "attention.self.value.weight": ("v",), "attention.output.dense.weight": ("out",),
    "intermediate.dense.weight": ("fc1",), "output.dense.weight": ("fc2",),
    # open_clip ResidualAttentionBlock (open_clip's own CLIP towers)
    "attn.in_proj_weight": ("q", "k", "v"), "attn.out_proj.weight": ("out",),
    "mlp.c_fc.weight": ("fc1",), "mlp.c_proj.weight": ("fc2",),
}
# ----------------------------------------------------------------------------------------------------

#: (lr, epochs, trained blocks) per dataset and protocol: the reference's ``configs/few_shot/<dataset>.yaml``
#: and ``configs/base2new/<dataset>.yaml`` (``lr``, ``train_epochs``, ``include_train_layers``; all:
#: batch 32, AdamW without weight decay, every matrix kind of both towers). The reference has no
#: base-to-novel config for BUSI and no config for DermaMNIST.
CLIPSVD_SETTINGS: dict[str, dict[str, tuple[float, int, str]]] = {
    "BTMRI": {"fewshot": (0.007, 100, "all"), "base2novel": (0.009, 100, "all")},
    "BUSI": {"fewshot": (0.002, 100, "all")},
    "CHMNIST": {"fewshot": (0.007, 100, "all"), "base2novel": (0.001, 60, "all")},
    "COVID_19": {"fewshot": (0.0005, 100, "all"), "base2novel": (0.002, 50, "all")},
    "CTKidney": {"fewshot": (0.001, 200, "all"), "base2novel": (0.01, 200, "top_middle")},
    "KneeXray": {"fewshot": (0.008, 100, "all"), "base2novel": (0.002, 60, "all")},
    "Kvasir": {"fewshot": (0.005, 100, "all"), "base2novel": (0.003, 60, "all")},
    "LungColon": {"fewshot": (0.003, 100, "all"), "base2novel": (0.01, 100, "all")},
    "OCTMNIST": {"fewshot": (0.01, 100, "all"), "base2novel": (0.02, 100, "all")},
    "RETINA": {"fewshot": (0.007, 100, "all"), "base2novel": (0.02, 60, "all")},
}
#: For other data: the median of the reference's learning rates for the protocol, 100 epochs, every block.
DEFAULT_SETTINGS: dict[str, tuple[float, int, str]] = {"fewshot": (0.006, 100, "all"),
                                                        "base2novel": (0.009, 100, "all")}
#: The reference's templates where they are not "a photo of a {}.".
CLIPSVD_TEMPLATES: dict[str, dict[str, str]] = {"COVID_19": {"fewshot": "a chest xray of {}."}}
DEFAULT_TEMPLATE = "a photo of a {}."


# ------------------------------------------------------------------------------ Lightning-free parts
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run LAPACK single-threaded for a while. Its threaded SVD gains little at these sizes and, on
    a machine whose cores are busy, waits on its own threads for up to ~1000x longer (measured: 0.5 s
    instead of 0.5 ms for a 64 x 64 matrix)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thin_svd(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U (m, r), s (r,), Vh (r, n)`` with ``weight = U diag(s) Vh``, r = min(m, n), in float32. A
    wide matrix is factorised through its transpose (about twice as fast as the wide form here)."""
    with torch.no_grad():
        w = weight.detach().float()
        if w.shape[0] >= w.shape[1]:
            return torch.linalg.svd(w, full_matrices=False)
        u, s, vh = torch.linalg.svd(w.t(), full_matrices=False)
        return vh.t().contiguous(), s, u.t().contiguous()


class SingularValues(nn.Module):
    """One frozen matrix W = U diag(s0) Vh with learnable singular values ``s`` (starting at s0)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        u, s0, vh = thin_svd(weight)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.register_buffer("s0", s0, persistent=False)
        self.s = nn.Parameter(s0.clone())

    def delta(self) -> Tensor:
        """``U diag(s - s0) Vh`` (m, n): what the learnt singular values add to W (exactly 0 at s0)."""
        return (self.u * (self.s - self.s0)) @ self.vh


def transformer_blocks(tower: nn.Module) -> nn.Module:
    """A tower's stack of transformer blocks: of its ModuleLists and Sequentials whose children are
    all of one type, the one holding the most parameters (timm's ``blocks``, BERT's
    ``encoder.layer``, open_clip's ``resblocks``)."""
    best, most = None, -1
    for module in tower.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) and \
                len({type(child) for child in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > most:
                best, most = module, size
    if best is None:
        raise ValueError(f"CLIP-SVD found no stack of transformer blocks in {type(tower).__name__}")
    return best


def tower_root(model: nn.Module, tower: str) -> nn.Module:
    """The module of one tower inside the open_clip model (`TOWER_ROOTS`)."""
    for name in TOWER_ROOTS[tower]:
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError(f"CLIP-SVD: the backbone {type(model).__name__} has no {tower} tower at any of "
                     f"{TOWER_ROOTS[tower]}; add its attribute to TOWER_ROOTS in methods/clip_svd.py")


def layer_indices(layers: str | list[int], depth: int, setting: str = "model.layers") -> list[int]:
    """Block indices of a tower of ``depth`` blocks: a preset (thirds of the depth, the reference's
    ``include_train_layers`` for 12 blocks: bottom 0-3, middle 4-7, top 8-11) or explicit indices."""
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(f"{setting} must be one of {LAYER_PRESETS} or a list of block indices, got {layers!r}")
        cut = [round(depth * k / 3) for k in range(4)]
        thirds = {"bottom": range(cut[0], cut[1]), "middle": range(cut[1], cut[2]), "top": range(cut[2], cut[3])}
        parts = thirds if layers == "all" else layers.split("_")
        return sorted(i for part in parts for i in thirds[part])
    wrong = [i for i in layers if not 0 <= i < depth]
    if wrong:
        raise ValueError(f"{setting}: block indices {wrong} do not exist in a tower of {depth} blocks (0..{depth - 1})")
    return sorted(set(layers))


class SingularValueTuning(nn.Module):
    """The learnable singular values of the chosen matrices of a backbone, and the weights they make.

    Holds one `SingularValues` per chosen matrix, keyed ``<tower>_<block>_<role>`` (``image_0_q``); it
    never holds the backbone (pass it to `call`), so its state is the singular values alone.

    Args:
        backbone: the frozen backbone wrapper (`dpt_lightning.backbone.BiomedCLIP`); its open_clip
            model is ``backbone.model``.
        towers: which towers learn (``image``, ``text``).
        layers: block indices, or a preset (`layer_indices`), applied to each tower.
        matrices: roles that learn: ``q``, ``k``, ``v``, ``out`` (attention), ``fc1``, ``fc2`` (MLP).
    """

    def __init__(self, backbone: nn.Module, towers=TOWERS, layers: str | list[int] = "all", matrices=ROLES):
        super().__init__()
        if not towers or set(towers) - set(TOWERS):
            raise ValueError(f"model.towers must be a non-empty subset of {TOWERS}, got {towers}")
        if not matrices or set(matrices) - set(ROLES):
            raise ValueError(f"model.matrices must be a non-empty subset of {ROLES}, got {matrices}")
        self.matrices = nn.ModuleDict()
        #: per tower: (backbone parameter name, [key of each row part, or None where it stays frozen])
        self.targets: dict[str, list[tuple[str, list[str | None]]]] = {}
        names = {id(p): name for name, p in backbone.named_parameters()}
        with one_thread():
            self._factorise(backbone, names, towers, layers, matrices)
        if not len(self.matrices):
            raise ValueError(f"CLIP-SVD: towers={list(towers)}, layers={layers}, matrices={list(matrices)} select no "
                             "matrix")

    def _factorise(self, backbone: nn.Module, names: dict[int, str], towers, layers, matrices) -> None:
        for tower in towers:
            blocks = transformer_blocks(tower_root(backbone.model, tower))
            self.targets[tower] = []
            for index in layer_indices(layers, len(blocks)):
                for name, weight in blocks[index].named_parameters():
                    if weight.dim() != 2:
                        continue
                    if name not in MATRIX_ROLES:
                        raise ValueError(f"CLIP-SVD does not know the matrix {name!r} of {type(blocks[index]).__name__} "
                                         "blocks; add it to MATRIX_ROLES in methods/clip_svd.py")
                    roles = MATRIX_ROLES[name]
                    parts = weight.detach().chunk(len(roles), dim=0)
                    keys = []
                    for role, part in zip(roles, parts):
                        key = f"{tower}_{index}_{role}" if role in matrices else None
                        if key is not None:
                            self.matrices[key] = SingularValues(part)
                        keys.append(key)
                    if any(keys):
                        self.targets[tower].append((names[id(weight)], keys))
            if not self.targets[tower]:  # e.g. a ResNet image tower: convolutions, no transformer matrices
                raise ValueError(f"CLIP-SVD: model.towers includes {tower!r}, but the {tower} tower of backbone "
                                 f"{getattr(backbone, 'name', '?')!r} has no transformer matrices among "
                                 f"model.layers={layers} / model.matrices={list(matrices)} (a ResNet image tower "
                                 "has none): leave it out, e.g. model.towers=[text]")

    @staticmethod
    def parameter_count(blocks: int, width: int, mlp_width: int) -> int:
        """Singular values of one tower with the reference's choice: per block q, k, v, out (width x
        width) and the two MLP matrices (width x mlp_width): ``blocks * (4 * width + 2 * min(width,
        mlp_width))``; 55,296 per BiomedCLIP tower (12, 768, 3072)."""
        return blocks * (4 * width + 2 * min(width, mlp_width))

    def weights(self, backbone: nn.Module, tower: str) -> dict[str, Tensor]:
        """The rebuilt matrices of one tower, by backbone parameter name: ``W + U diag(s - s0) Vh`` for
        each learnt part, the frozen rows as they are (in fp32 also under autocast)."""
        out = {}
        with torch.autocast(self.device_type(), enabled=False):
            for name, keys in self.targets.get(tower, []):
                weight = backbone.get_parameter(name)
                rows = weight.shape[0] // len(keys)
                deltas = [self.matrices[key].delta().to(weight.dtype) if key else weight.new_zeros(rows, weight.shape[1])
                          for key in keys]
                out[name] = weight + (deltas[0] if len(deltas) == 1 else torch.cat(deltas))
        return out

    def device_type(self) -> str:
        return next(iter(self.buffers())).device.type

    def call(self, backbone: nn.Module, tower: str, method: str, *args, **kwargs):
        """``backbone.<method>(*args, **kwargs)`` computed with this tower's rebuilt matrices. The
        backbone's parameters are swapped for the call only (`torch.func.functional_call`) and are
        the untouched frozen tensors again when it returns (also after an error)."""
        weights = self.weights(backbone, tower)
        if not weights:
            return getattr(backbone, method)(*args, **kwargs)
        return functional_call(_BackboneMethod(backbone, method), {f"backbone.{k}": v for k, v in weights.items()},
                               args, kwargs)


class _BackboneMethod(nn.Module):
    """One method of the backbone as a module's forward, so that ``functional_call`` can run it."""

    def __init__(self, backbone: nn.Module, method: str):
        super().__init__()
        self.backbone, self.method = backbone, method

    def forward(self, *args, **kwargs):
        return getattr(self.backbone, self.method)(*args, **kwargs)


def cosine_lr_factor(step: int, period: int, lr: float, eta_min: float) -> float:
    """LR multiplier ``(eta_min + (lr - eta_min) (1 + cos(pi step / period)) / 2) / lr``: the closed
    form of ``CosineAnnealingLR(T_max=period, eta_min)`` (periodic: back at lr after 2 x period steps)."""
    return (eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * step / period)) / 2.0) / lr


# ------------------------------------------------------------------------------------------- method
class CLIPSVD(PromptTrainer):
    """Singular-value fine-tuning of both frozen towers (see the module docstring).

    Trains the singular values of the chosen matrices only (110,592 on BiomedCLIP with the defaults);
    the image path learns, so image features are never cached.

    Args:
        template: the class prompt, ``{}`` is the class name; ``None`` = the reference's for the
            dataset (``a photo of a {}.``; ``a chest xray of {}.`` for COVID_19 few-shot).
        lr: AdamW's learning rate; ``None`` = the reference's for the dataset and protocol
            (`CLIPSVD_SETTINGS`, else `DEFAULT_SETTINGS`), recorded in the hyper-parameters.
        weight_decay: AdamW's decoupled weight decay on the singular values (reference: 0).
        towers: towers that learn (reference ``train_image_encoder`` / ``train_text_encoder``).
        layers: blocks that learn in each tower: ``all`` or a preset of the reference
            (``bottom``, ``middle``, ``top``, ``bottom_middle``, ``top_middle``, ``top_bottom``: thirds
            of the depth) or a list of block indices; ``None`` = the reference's for the dataset and
            protocol (``all``; ``top_middle`` for CTKidney base-to-novel), recorded in the hyper-parameters.
        matrices: matrices that learn: ``q``, ``k``, ``v``, ``out``, ``fc1``, ``fc2``.
        schedule: ``reference`` (cosine of period 2 x ``trainer.max_epochs`` steps, stepped per batch,
            as the reference) or ``cosine`` (one cosine from lr to eta_min over all steps of the fit).
        eta_min: the schedule's lowest learning rate.
        hflip: random horizontal flips of the training images (reference: yes).
        drop_last_batch: drop the last partial training batch of an epoch (Dassl's rule, the other
            methods); the reference's loader keeps it (``False``).
        **kwargs: `PromptTrainer`'s (backbone, ...; ``momentum`` is not used, and there is no
            warm-up: ``warmup_epochs`` must stay 0).
    """

    reference_backbone_dropout = True
    #: The reference's loader keeps an epoch's last partial batch (``drop_last_batch`` changes it).
    drop_last_batch = False

    def __init__(
        self,
        template: str | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        towers: list[Tower] = ("image", "text"),
        layers: str | list[int] | None = None,
        matrices: list[str] = ROLES,
        schedule: Literal["reference", "cosine"] = "reference",
        eta_min: float = 1e-6,
        hflip: bool = True,
        drop_last_batch: bool = False,
        warmup_epochs: int = 0,
        **kwargs,
    ):
        protocol = kwargs.get("protocol", "fewshot")
        default = DEFAULT_SETTINGS.get(protocol, DEFAULT_SETTINGS["fewshot"])  # a bad protocol fails below
        resolved = resolve_settings({"lr": lr}, CLIPSVD_SETTINGS, default, kwargs.get("dataset"), protocol, "CLIPSVD")
        if warmup_epochs != 0:
            raise ValueError("CLIPSVD has no warm-up (the reference: AdamW with a cosine from the first step); "
                             "leave model.warmup_epochs at 0")
        if schedule not in ("reference", "cosine") or eta_min < 0:
            raise ValueError(f"model.schedule must be 'reference' or 'cosine' and model.eta_min >= 0, got "
                             f"{schedule!r}, {eta_min}")
        super().__init__(lr=resolved["lr"], weight_decay=weight_decay, warmup_epochs=warmup_epochs, **kwargs)
        self.drop_last_batch = drop_last_batch
        # lists, not the defaults' tuples: hparams.yaml must load with yaml.safe_load
        record_hparams(self, lr=resolved["lr"], towers=list(towers), matrices=list(matrices))

    def configure_prompts(self) -> None:
        hp = self.hparams
        template = hp.template
        if template is None:
            template = (dataset_setting(CLIPSVD_TEMPLATES, hp.dataset, hp.protocol) or DEFAULT_TEMPLATE)
        layers = hp.layers
        if layers is None:
            layers = (dataset_setting(CLIPSVD_SETTINGS, hp.dataset, hp.protocol) or DEFAULT_SETTINGS[hp.protocol])[2]
        record_hparams(self, template=template, layers=layers if isinstance(layers, str) else list(layers))
        prompts = [fill_template(template, name) for name in self.classnames]
        check_class_texts(self.backbone, [[p] for p in prompts], self.classnames, "model.template")
        self.register_buffer("prompt_ids", self.tokenize(prompts), persistent=False)
        self.svd = SingularValueTuning(self.backbone, list(hp.towers), hp.layers, list(hp.matrices))

    # ----------------------------------------------------------------------------------- towers
    def encode_images(self, images: Tensor) -> Tensor:
        features = self.svd.call(self.backbone, "image", "encode_image", self.transform_images(images),
                                 self.visual_prompts(), mode=self.visual_mode)
        return F.normalize(features.float(), dim=-1)

    def encode_classes(self, image_features: Tensor | None = None) -> Tensor:
        return F.normalize(self.svd.call(self.backbone, "text", "encode_text", self.prompt_ids).float(), dim=-1)

    # --------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_transforms"):
            cfg = self.backbone.preprocess_cfg
            train = view_transform(self.backbone.image_size, cfg["mean"], cfg["std"], (0.08, 1.0), self.hparams.hflip)
            datamodule.use_transforms(train, self.backbone.test_transform())

    def on_fit_start(self) -> None:
        row = dataset_setting(CLIPSVD_SETTINGS, self.hparams.dataset, self.hparams.protocol)
        if row is not None and self.trainer.max_epochs != row[1]:
            rank_zero_info(f"CLIPSVD: the reference trains {self.hparams.dataset} ({self.hparams.protocol}) for "
                           f"{row[1]} epochs; this fit runs {self.trainer.max_epochs} (--trainer.max_epochs)")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, betas=(0.9, 0.999),
                                      weight_decay=hp.weight_decay)
        period = 1
        if self._trainer is not None:
            epochs = self.trainer.max_epochs
            period = epochs if hp.schedule == "reference" and epochs and epochs > 0 else \
                self.trainer.estimated_stepping_batches
            if not math.isfinite(period):
                raise ValueError("CLIPSVD's cosine needs the fit's length: set trainer.max_epochs or trainer.max_steps")
        period = max(int(period), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_lr_factor(step, period, hp.lr, hp.eta_min))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
