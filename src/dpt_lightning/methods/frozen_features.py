"""What the frozen-feature baselines share (linear probe, LP++, CLIP-Adapter, Tip-Adapter(-F)):
the training set seen through the frozen image tower, each augmented view encoded once, and a
fit that runs on those cached features instead of on images.

Views. Pass ``p`` over the few-shot training set is every training image under the datamodule's
augmentation of epoch ``p`` (seeded by (seed, p, index), see `data.dataset`), in that epoch's
shuffled order. A method asks `TrainingViews.next_pass` for the passes it needs, in the order the
reference code draws them (the n-th pass over the training set is epoch ``n``'s views); each pass
goes through the tower exactly once. The validation split is encoded once with the test transform.
A grid-level feature store can serve these passes unchanged: a pass is identified by the backbone,
the plain image path, the training transform, the data seed, the epoch and the item.

Lightning. ``on_fit_start`` encodes the validation split and sets the head's data-derived starting
values (``prepare_fit``); the fit itself (the head's epochs over the passes, searches on
validation) runs in the first training step, with manual optimisation: every optimiser step goes
through Lightning's optimisers (so ``global_step`` counts the head's steps and checkpoints are
written as usual), then the trainer stops. ``trainer.max_epochs`` is the number of epochs of the
head's training over the cached features (methods without epochs ignore it). The image batch
Lightning hands to that step is not used: the passes above read the training set themselves.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms as T

from dpt_lightning.methods.base import NonFiniteLossError, PromptTrainer
from dpt_lightning.methods.checkpoints import CheckpointMismatchError


def view_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop_scale: Sequence[float],
                   hflip: bool) -> Callable:
    """The training augmentation of the reference adapter scripts: RandomResizedCrop (bicubic,
    ``crop_scale``), an optional horizontal flip (p 0.5), then normalisation."""
    steps = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


@dataclass
class FeatureSet:
    """L2-normalised image features (N, D) with their labels (N,) and item indices (N,), in the
    order the images were visited (a training pass: its epoch's shuffled order), and ``raw``: the
    same features before the normalisation, the image tower's output (open_clip's ``encode_image``),
    which averages over passes need; a set given only normalised features takes them as ``raw``."""

    features: Tensor
    labels: Tensor
    indices: Tensor
    raw: Tensor | None = None

    def __post_init__(self) -> None:
        if self.raw is None:
            self.raw = self.features

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[slice]:
        """Consecutive mini-batches in visiting order; the last one may be smaller (the reference
        loaders keep it)."""
        for start in range(0, len(self), batch_size):
            yield slice(start, start + batch_size)

    def by_item(self) -> FeatureSet:
        """The same features sorted by item index (to line up several passes)."""
        order = torch.argsort(self.indices)
        return FeatureSet(self.features[order], self.labels[order], self.indices[order], self.raw[order])


def encode_batches(batches, encode: Callable[[dict], Tensor], device: torch.device) -> FeatureSet:
    """Features of every batch (dicts with ``image``, ``label`` and the dataset's ``path`` and
    ``view``): ``encode`` gives the tower's output (unnormalised), each batch is normalised as
    `PromptTrainer.encode_images` normalises; no gradients; items are numbered in the order they come."""
    raw, features, labels = [], [], []
    with torch.no_grad():
        for batch in batches:
            raw.append(encode({**batch, "image": batch["image"].to(device)}).float())
            features.append(F.normalize(raw[-1], dim=-1))
            labels.append(torch.as_tensor(batch["label"]).to(device))
    if not features:
        raise ValueError("no images to encode")
    labels = torch.cat(labels)
    return FeatureSet(torch.cat(features), labels, torch.arange(len(labels), device=device), torch.cat(raw))


class TrainingViews:
    """Passes over the training set of a datamodule's train loader, encoded on request.

    ``next_pass()`` encodes the views of the next epoch (0, 1, 2, ...), each once. The images are
    read by one loader over all passes (its workers start once); the tower runs in this process,
    only on the images of requested passes. With ``distinct`` set, only the first ``distinct``
    passes are encoded and kept; pass ``p`` after them is pass ``p % distinct`` again. ``encoded``
    counts the images encoded so far.
    """

    def __init__(self, loader: DataLoader, encode: Callable[[dict], Tensor], device: torch.device,
                 distinct: int | None = None):
        self.dataset, self.sampler = loader.dataset, loader.sampler
        self.batch_size, self.num_workers = loader.batch_size or 1, loader.num_workers
        self.encode, self.device, self.distinct = encode, device, distinct
        self.passes = self.encoded = 0
        self._batches: Iterator | None = None
        self._kept: dict[int, FeatureSet] = {}

    def _keys(self, epoch: int) -> list:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
            return list(self.sampler)
        return list(range(len(self.dataset)))

    def _batch_keys(self) -> Iterator[list]:
        for epoch in itertools.count():
            keys = self._keys(epoch)
            for start in range(0, len(keys), self.batch_size):
                yield keys[start:start + self.batch_size]

    def next_pass(self) -> FeatureSet:
        """The features of the next pass, in its epoch's shuffled order."""
        if self.distinct is not None and self.passes >= self.distinct:
            self.passes += 1
            return self._kept[(self.passes - 1) % self.distinct]
        if self._batches is None:
            loader = DataLoader(self.dataset, batch_sampler=self._batch_keys(), num_workers=self.num_workers)
            self._batches = iter(loader)
        keys = self._keys(self.passes)
        indices = torch.tensor([key[0] if isinstance(key, tuple) else key for key in keys], device=self.device)
        count = -(-len(keys) // self.batch_size)
        views = encode_batches(itertools.islice(self._batches, count), self.encode, self.device)
        views = dataclasses.replace(views, indices=indices)
        if self.distinct is not None:
            self._kept[self.passes] = views
        self.passes += 1
        self.encoded += len(views)
        return views

    def close(self) -> None:
        """Stop the image loader (and its workers)."""
        self._batches = None


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (0..1)."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class GridSearch(torch.optim.Optimizer):
    """A gradient-free optimiser over a grid. Each parameter group holds one scalar parameter and
    its ``grid`` (a list of values). ``step(closure)``: ``closure()`` returns the loss at every grid
    point at once, a tensor of shape ``(len(grid_1), len(grid_2), ...)``; the parameters are set to
    the point of the lowest loss, the first one in row-major order on ties (the first group's values
    change slowest). Returns that loss."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, {})
        for group in self.param_groups:
            if len(group["params"]) != 1 or group["params"][0].numel() != 1 or not group.get("grid"):
                raise ValueError("GridSearch: each group needs one scalar parameter and a non-empty 'grid'")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        shape = tuple(len(group["grid"]) for group in self.param_groups)
        losses = closure()
        if tuple(losses.shape) != shape:
            raise ValueError(f"GridSearch: the closure must return the losses of the grid, shape {shape}; got "
                             f"{tuple(losses.shape)}")
        best = int(torch.argmin(losses.reshape(-1)))
        for group, index in zip(self.param_groups, torch.unravel_index(torch.tensor(best), shape)):
            group["params"][0].fill_(group["grid"][int(index)])
        return losses.reshape(-1)[best]


class FrozenFeatureTrainer(PromptTrainer):
    """Base of the methods that fit a head on frozen image features (see the module docstring).

    A subclass builds its head in ``configure_prompts``, computes its logits in ``logits``, returns
    its optimisers from ``configure_optimizers`` and fits in ``fit_features``. Its fitted tensors
    whose shape depends on the data (a cache of training features) are named in ``data_shaped``:
    a checkpoint gives them their shape before loading.

    Args:
        crop_scale: RandomResizedCrop scale range of the training views (reference: 0.5-1).
        hflip: random horizontal flips of the training views (reference: yes).
        view_passes: ``None`` (reference): every pass over the training set draws fresh views;
            a number N: only N passes go through the tower and later passes reuse them in turn
            (fewer tower passes for CLIP-Adapter and Tip-Adapter-F, less augmentation variety).
    """

    #: Does the fit select or search on the validation split (which must then have images)?
    uses_validation: ClassVar[bool] = True
    #: Fitted tensors (parameters or buffers) whose shape comes from the training data.
    data_shaped: ClassVar[tuple[str, ...]] = ()

    def __init__(self, crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True,
                 view_passes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"model.crop_scale must be two numbers 0 < low <= high <= 1, got {crop_scale}")
        if view_passes is not None and view_passes < 1:
            raise ValueError(f"model.view_passes must be at least 1 (or null: fresh views every pass), got "
                             f"{view_passes}")
        self.automatic_optimization = False
        self._plain_optimizers: list | None = None
        self._fit_inputs = None
        #: Has the head been fitted? Saved with it, so that a fit resumed from its checkpoint
        #: (restored before ``on_fit_start``) neither encodes nor changes anything.
        self.register_buffer("fitted", torch.tensor(False))

    # ------------------------------------------------------------------ views
    def train_view_transform(self) -> Callable:
        cfg = self.backbone.preprocess_cfg
        return view_transform(self.backbone.image_size, cfg["mean"], cfg["std"], self.hparams.crop_scale,
                              self.hparams.hflip)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_transforms"):
            datamodule.use_transforms(self.train_view_transform(), self.backbone.test_transform())

    def encode_frozen(self, batch: dict) -> Tensor:
        """The frozen image tower's output for a batch (B, D), before the normalisation (open_clip's
        ``encode_image``: ``pool_images`` then the projection), without gradients; the pooled tokens
        come from the feature store when it is on, as in `PromptTrainer.image_features`."""
        with torch.no_grad():
            store = self.feature_store()
            if store is None or "view" not in batch:
                pooled = self.pool_images(batch["image"])
            else:
                pooled = store.pooled(batch["path"], batch["view"], batch["image"], self.pool_images)
            return self.backbone.project_image(pooled).float()

    # ------------------------------------------------------------- the fit
    def prepare_fit(self, views: TrainingViews, val: FeatureSet | None):
        """Set the head's data-derived starting values (a cache, initial weights) before training
        starts; returns what ``fit_features`` needs besides the views (e.g. the pass it used)."""
        return None

    def fit_features(self, views: TrainingViews, val: FeatureSet | None, epochs: int,
                     prepared=None) -> dict[str, float]:
        """Fit the head from training passes (``views.next_pass()``) and the validation features;
        ``epochs`` is the head's number of training epochs. Returns values to log, among them
        ``train_loss`` (the fitted head's training loss)."""
        raise NotImplementedError

    def fit_frozen(self, views: TrainingViews, val: FeatureSet | None, epochs: int) -> dict[str, float]:
        """The whole fit outside Lightning: ``prepare_fit`` then ``fit_features``."""
        return self.fit_features(views, val, epochs, self.prepare_fit(views, val))

    def on_fit_start(self) -> None:
        """Encode the validation split, open the training passes and set the data-derived
        starting values, so that callbacks see the head as its training starts."""
        self._fit_inputs = None
        if self.fitted:  # resumed from a checkpoint of the fitted head: nothing to do
            return
        datamodule, epochs = self.trainer.datamodule, self.trainer.max_epochs
        if datamodule is None:
            raise ValueError(f"{type(self).__name__} reads its training passes from a datamodule; fit with one")
        if not epochs or epochs < 1:
            raise ValueError(f"{type(self).__name__}: trainer.max_epochs is the number of epochs of the head's "
                             f"training and must be at least 1, got {epochs}")
        val = None
        if self.uses_validation:
            loader = datamodule.val_dataloader()
            if not len(loader.dataset):
                raise ValueError(f"{type(self).__name__} searches its settings on the validation split, which is "
                                 "empty here; give every class validation images (data.num_shots selects "
                                 "min(K, 4) per class)")
            val = encode_batches(loader, self.encode_frozen, self.device)
        views = TrainingViews(datamodule.train_dataloader(), self.encode_frozen, self.device,
                              distinct=self.hparams.view_passes)
        with torch.autocast(self.device.type, enabled=False):
            self._fit_inputs = (views, val, self.prepare_fit(views, val))

    def on_train_batch_start(self, batch: dict, batch_idx: int):
        super().on_train_batch_start(batch, batch_idx)
        self.trainer.should_stop = True  # the first step is the whole training
        if self._fit_inputs is None:
            return -1  # fitted already: skip the epoch

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        views, val, prepared = self._fit_inputs
        try:
            with torch.autocast(self.device.type, enabled=False):
                summary = self.fit_features(views, val, int(self.trainer.max_epochs), prepared)
        finally:
            views.close()
            self._fit_inputs = None
        self.fitted.fill_(True)
        for optimizer in self.head_optimizers():  # the fit is over: keep checkpoints small
            getattr(optimizer, "optimizer", optimizer).state.clear()
        summary = {"train_views_encoded": float(views.encoded), **summary}
        loss = torch.tensor(float(summary["train_loss"]))
        bad = (["train_loss"] if not torch.isfinite(loss) else []) + [
            name for name, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:  # the head's own loop ran all its epochs in this one step: refuse its result
            raise NonFiniteLossError(f"non-finite {', '.join(bad)} after the fit of {type(self).__name__}; "
                                     "lower model.lr or check the features (e.g. --trainer.precision 32-true)")
        self.log_dict({k: float(v) for k, v in summary.items()}, on_step=True, on_epoch=False)
        return loss

    # ------------------------------------------------------- optimisation
    def head_optimizers(self) -> list:
        """The optimisers of ``configure_optimizers``: Lightning's (its step count is the run's
        ``global_step``) during a fit, plain ones when the fit is called directly."""
        if self._trainer is not None:
            optimizers = self.optimizers()
            if optimizers:
                return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
        if self._plain_optimizers is None:
            configured = self.configure_optimizers()
            self._plain_optimizers = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        return self._plain_optimizers

    def head_backward(self, loss: Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    # ---------------------------------------------------------- checkpoints
    def check_fitted_tensors(self, state: dict) -> list[str]:
        """Problems of the fitted tensors (``data_shaped``) of a checkpoint that their shapes alone do
        not show (e.g. labels out of range); a subclass with such tensors extends this."""
        return []

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        missing = [name for name in self.data_shaped if name not in state]
        if missing:
            raise CheckpointMismatchError(f"checkpoint lacks the fitted tensors {missing} of {type(self).__name__}")
        problems, own = [], self.state_dict()
        for name in self.data_shaped:  # only the first dimension (the number of training items) may differ
            current, stored = own[name], state[name]
            if stored.dim() != current.dim() or stored.shape[1:] != current.shape[1:]:
                problems.append(f"{name} has shape {tuple(stored.shape)} (this model: (N, "
                                f"{', '.join(map(str, current.shape[1:]))}))" if current.dim() > 1 else
                                f"{name} has shape {tuple(stored.shape)} (this model: one dimension)")
        problems = problems or self.check_fitted_tensors(state)
        if problems:
            raise CheckpointMismatchError(f"the fitted tensors of this {type(self).__name__} checkpoint are not "
                                          f"consistent: {'; '.join(problems)}; it was altered or damaged: use the "
                                          "checkpoint as the fit wrote it, or fit again")
        for name in self.data_shaped:
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            current, stored = getattr(module, attr), state[name]
            if current.shape != stored.shape:
                if isinstance(current, torch.nn.Parameter):
                    current.data = torch.empty(stored.shape, dtype=current.dtype, device=current.device)
                else:
                    setattr(module, attr, torch.empty(stored.shape, dtype=current.dtype, device=current.device))
        super().on_load_checkpoint(checkpoint)

