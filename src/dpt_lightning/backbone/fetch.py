"""Fetching an open_clip model's files from the Hugging Face hub: verified, one message per failure,
nothing half-written.

open_clip's own ``hf-hub:`` loader swallows a failed weights download and goes on building the
model with its text tower's *pretrained* weights (440 MB more for BiomedCLIP's BERT), then fails
with a message about those; and huggingface_hub checks a transfer's size, not its content, so a
corrupted weights file would stay in the cache and fail every later load. So, before open_clip
runs on a model that is not in the cache, `prefetch_open_clip` downloads what it reads first (its
``open_clip_config.json``, the weights file it picks, the text tower's ``config.json``) and checks
each new large file against the SHA-256 the hub publishes (its ETag); a mismatch is removed from
the cache. `staged_folder` builds a ``local-dir:`` folder in a temporary sibling and moves the files
in only once all of them arrived and were checked (`verify_folder`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dpt_lightning.files import is_sha256, sha256_file
from dpt_lightning.hub_errors import describe_hub_failure, is_not_found

#: The weights files open_clip's hf-hub loader tries, in its order (``download_pretrained_from_hf``).
OPEN_CLIP_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class HubFetchError(RuntimeError):
    """A model's files could not be fetched: one message saying which file, what happened and what to do."""


class HubFileNotFound(HubFetchError):
    """The hub has no such file (HTTP 404)."""


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn a hub failure inside into a `HubFetchError` about ``what`` (other errors pass)."""
    try:
        yield
    except HubFetchError:
        raise
    except Exception as err:
        failure = describe_hub_failure(err)
        if failure is None:
            raise
        raise (HubFileNotFound if is_not_found(err) else HubFetchError)(f"{what}: {failure}") from None


def _download_verified(repo: str, filename: str) -> Path:
    """``hf_hub_download`` into the cache; a large file downloaded now must have its published SHA-256."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo, filename), str)
    with hub_errors(f"downloading {filename} of {repo}"):
        pointer = Path(hf_hub_download(repo, filename))
    blob = Path(os.path.realpath(pointer))
    if not cached and is_sha256(blob.name):
        digest = sha256_file(blob)
        if digest != blob.name:
            blob.unlink()
            pointer.unlink(missing_ok=True)
            raise HubFetchError(f"the downloaded {filename} of {repo} does not match the SHA-256 the hub publishes "
                                f"for it (got {digest[:16]}..., expected {blob.name[:16]}...) and was removed from "
                                "the cache")
    return pointer


def prefetch_open_clip(repo: str) -> None:
    """Download (verified) the files open_clip's hf-hub loader reads first into the Hugging Face cache."""
    config = json.loads(_download_verified(repo, "open_clip_config.json").read_text())
    for weights in OPEN_CLIP_HUB_WEIGHTS:
        try:
            _download_verified(repo, weights)
            break
        except HubFileNotFound:
            continue
    else:
        raise HubFetchError(f"{repo} has no open_clip weights on the hub (neither {' nor '.join(OPEN_CLIP_HUB_WEIGHTS)}"
                            "): check the name")
    text_model = config.get("model_cfg", {}).get("text_cfg", {}).get("hf_model_name")
    if text_model and not os.path.isdir(text_model):
        _download_verified(text_model, "config.json")


def verify_folder(repo: str, folder: Path) -> None:
    """Every large file of ``repo`` that is in ``folder`` has the SHA-256 the hub lists for it."""
    import huggingface_hub

    with hub_errors(f"listing the files of {repo}"):
        entries = [e for e in huggingface_hub.list_repo_tree(repo, recursive=True) if getattr(e, "lfs", None)]
    for entry in entries:
        path = folder / entry.path
        if path.is_file() and sha256_file(path) != entry.lfs.sha256:
            raise HubFetchError(f"the downloaded {entry.path} of {repo} does not match the SHA-256 the hub publishes "
                                "for it")


@contextlib.contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder beside ``folder`` to download into; when the body succeeds its files (not
    huggingface_hub's ``.cache``) are moved into ``folder``, otherwise nothing reaches it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.download-", dir=folder.parent))
    try:
        yield staging
        folder.mkdir(exist_ok=True)
        for path in sorted(staging.rglob("*")):
            relative = path.relative_to(staging)
            if relative.parts[0] == ".cache" or path.is_dir():
                continue
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, folder / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
