"""Downloading a dataset's archive from the Hugging Face hub (``dpt-data download``).

Through ``huggingface_hub``, which reads ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` as
everywhere else: `hf_hub_url` and `get_hf_file_metadata` give the archive's address, size and
SHA-256 (its ETag), ``http_get`` transfers it with a progress bar. What this module adds:

* **resumable**: the bytes go to ``<root>/.dpt-data/<file>.<etag>.part``; an interrupted transfer
  (a lost connection, Ctrl+C, a full disk) is resumed from there by the next run with an HTTP
  ``Range`` request (huggingface_hub also resumes a few times within one run);
* **verified**: the finished part must have the size and the SHA-256 the hub publishes; a
  mismatch removes it. Only then is it renamed to ``<root>/.dpt-data/<file>``, a verified archive
  that a later run (offline too) unpacks without downloading it again;
* **offline mode respected**: with ``HF_HUB_OFFLINE=1`` nothing is requested; a verified
  archive already there is unpacked, anything else is one error saying what to do;
* **one message per failure**, naming the file and the fix (`DownloadError`).

Unpacking and installing are `archives.prepare_dataset`'s, so a dataset folder exists only complete.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from dpt_lightning.data.archives import (DatasetInstallError, dataset_lock, gib, install_archives, os_error_message,
                                         require_space, work_folder)
from dpt_lightning.data.catalogue import CatalogueEntry, HubArchive
from dpt_lightning.files import is_sha256, sha256_file
from dpt_lightning.hub_errors import http_status, hub_endpoint, hub_offline, is_not_found, is_transfer_error

class DownloadError(DatasetInstallError):
    """A download that failed, in one message naming the file and what to do."""


def archive_url(archive: HubArchive) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(archive.repo, archive.filename, repo_type=archive.repo_type, revision=archive.revision)


def _http_failure(err: Exception, entry: CatalogueEntry, root: Path, url: str, part: Path | None) -> DownloadError:
    """The one message for an error of huggingface_hub or of its HTTP client."""
    archive = entry.archive
    resume = (f"; the {gib(part.stat().st_size)} already downloaded are kept in {part} and the next run resumes "
              "from there") if part is not None else "; nothing was installed"
    if is_not_found(err):
        return DownloadError(f"{archive.filename} is not in the Hugging Face {archive.repo_type} repository "
                             f"{archive.repo} at {archive.revision} (HTTP 404 for {url}); nothing was installed. "
                             f"If you have the archive from elsewhere: dpt-data prepare {entry.name} --root {root} "
                             "--archive <file>")
    status = http_status(err)
    if status is not None:
        return DownloadError(f"the hub answered HTTP {status[0]} for {archive.filename} ({url}){resume}. Try again "
                             f"later: {entry.fetch_command(root)}")
    return DownloadError(f"downloading {archive.filename} from {hub_endpoint()} failed ({type(err).__name__}: "
                         f"{err}){resume}. Check the connection (HF_ENDPOINT, proxy) and run the same command "
                         "again")


def fetch_archive(entry: CatalogueEntry, root: Path) -> Path:
    """The verified archive of ``entry`` in ``<root>/.dpt-data/``: the one a previous run left, or
    downloaded now (resuming a part left by an interrupted run); see the module doc."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    archive = entry.archive
    work = work_folder(root)
    final = work / archive.filename
    if final.is_file():  # renamed there only after its checks
        print(f"{entry.name}: using the verified archive {final} of an earlier run")
        return final
    if hub_offline():
        raise DownloadError(f"{entry.name}: HF_HUB_OFFLINE is set, so {archive.filename} cannot be downloaded. Unset "
                            f"it (HF_HUB_OFFLINE=0 {entry.fetch_command(root)}), or copy the archive from a machine "
                            f"with internet ({archive.page}) and run: dpt-data prepare {entry.name} --root {root} "
                            "--archive <file>")
    url, part = archive_url(archive), None
    try:
        meta = get_hf_file_metadata(url)
        if not meta.etag:
            raise DownloadError(f"the hub gave no checksum (ETag) for {url}: is HF_ENDPOINT ({hub_endpoint()}) a "
                                "Hugging Face hub?")
        part = work / f"{archive.filename}.{meta.etag[:16]}.part"
        for stale in work.glob(f"{archive.filename}.*.part"):  # parts of an older version of the archive
            if stale != part:
                stale.unlink()
        have = part.stat().st_size if part.is_file() else 0
        if meta.size is not None and have > meta.size:
            part.unlink()
            have = 0
        if meta.size is not None:
            require_space(meta.size - have, work, f"downloading {archive.filename}",
                          f"free some space, or give another --root, and run: {entry.fetch_command(root)}")
        if meta.size is None or have < meta.size:
            verb = f"resuming at {gib(have)} of" if have else "downloading"
            size = gib(meta.size) if meta.size is not None else "unknown size"
            print(f"{entry.name}: {verb} {archive.filename} ({size}) from {archive.repo}")
            same_origin = urlsplit(meta.location)[:2] == urlsplit(url)[:2]
            headers = build_hf_headers(token=None if same_origin else False)  # no token to a CDN
            with open(part, "ab") as sink:
                http_get(meta.location, sink, resume_size=have, headers=headers, expected_size=meta.size,
                         displayed_filename=archive.filename)
        _verify(part, meta.etag, meta.size, entry, root)
    except DownloadError:
        raise
    except HfHubHTTPError as err:
        raise _http_failure(err, entry, root, url, _drop_if_empty(part)) from None
    except OSError as err:
        part = _drop_if_empty(part)
        if err.errno is None:  # huggingface_hub's "Consistency check failed": fewer bytes than announced
            raise _http_failure(err, entry, root, url, part) from None
        kept = " (the part already downloaded is resumed)" if part is not None else ""
        raise DownloadError(os_error_message(err, f"downloading {archive.filename} into {work}") + kept) from None
    except Exception as err:
        if is_transfer_error(err):
            raise _http_failure(err, entry, root, url, _drop_if_empty(part)) from None
        raise
    part.rename(final)
    return final


def _drop_if_empty(part: Path | None) -> Path | None:
    """The part file of a failed transfer if it holds bytes to resume from; an empty one is removed."""
    if part is not None and part.is_file() and part.stat().st_size == 0:
        part.unlink()
    return part if part is not None and part.is_file() else None


def _verify(part: Path, etag: str, size: int | None, entry: CatalogueEntry, root: Path) -> None:
    """The finished part has the hub's size and, for a large (LFS) file, its SHA-256; else it is removed."""
    name = entry.archive.filename
    actual = part.stat().st_size
    if size is not None and actual != size:
        part.unlink()
        raise DownloadError(f"{name}: {actual} bytes arrived, the hub announced {size}; the download was removed. "
                            f"Run again: {entry.fetch_command(root)}")
    if is_sha256(etag):
        print(f"{entry.name}: checking the SHA-256 of {name}")
        digest = sha256_file(part)
        if digest != etag:
            part.unlink()
            raise DownloadError(f"{name} does not match the SHA-256 the hub publishes for it (got {digest[:16]}..., "
                                f"expected {etag[:16]}...): the damaged download was removed. Run again: "
                                f"{entry.fetch_command(root)}")


def download_dataset(entry: CatalogueEntry, root: Path, replace: bool = False, keep_archive: bool = False,
                     progress: bool = True) -> Path:
    """Download ``entry``'s archive (`fetch_archive`) and install it as ``<root>/<DIR>``; returns
    that folder. The archive is removed afterwards unless ``keep_archive``; it stays when unpacking
    fails, so that the next run does not download it again."""
    if entry.archive is None:
        raise DownloadError(f"{entry.name} cannot be downloaded for you ({entry.licence}). {entry.access} Then: "
                            f"{entry.fetch_command(root)}")
    root = Path(root)
    target = root / entry.name
    if (target.exists() or target.is_symlink()) and not replace:
        raise DownloadError(f"{target} exists: nothing was downloaded. To replace it: "
                            f"{entry.fetch_command(root, replace=True)}")
    with dataset_lock(root, entry):
        archive = fetch_archive(entry, root)
        folder = install_archives(entry, [archive], root, replace=replace, progress=progress)
        if not keep_archive:
            archive.unlink()
    return folder


def remote_size(entry: CatalogueEntry) -> int | None:
    """The archive's size as the hub reports it (``dpt-data download --dry-run``)."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError

    url = archive_url(entry.archive)
    try:
        return get_hf_file_metadata(url).size
    except HfHubHTTPError as err:
        raise _http_failure(err, entry, Path("."), url, None) from None
    except Exception as err:
        if is_transfer_error(err):
            raise _http_failure(err, entry, Path("."), url, None) from None
        raise
