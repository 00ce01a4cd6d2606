"""What went wrong talking to the Hugging Face hub, in words: shared by the dataset downloads
(``data.download``) and the backbone's (``backbone.fetch``).

huggingface_hub reports a failure in many shapes: its own HTTP errors (often wrapped in a
``LocalEntryNotFoundError`` "cannot find the requested files in the local cache"), the errors of its
HTTP client (``httpx``/``httpx2``, ``requests`` in older versions), a bare ``OSError`` for a transfer
that ended early. `describe_hub_failure` walks the chain of causes and says which it was.
"""
from __future__ import annotations

from collections.abc import Iterator

#: The hub's "not found" errors (by class name: they moved between huggingface_hub versions).
NOT_FOUND = ("EntryNotFoundError", "RemoteEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_transfer_error(err: BaseException) -> bool:
    """An error of the HTTP client (connection, timeout, protocol), whichever client huggingface_hub uses."""
    return type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def is_not_found(err: BaseException) -> bool:
    return any(type(e).__name__ in NOT_FOUND for e in causes(err))


def http_status(err: BaseException) -> tuple[int, str] | None:
    """(status, url) of the HTTP error in ``err``'s chain, if there is one."""
    for e in causes(err):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            request = getattr(response, "request", None)
            return status, str(getattr(request, "url", "") or "")
    return None


def describe_hub_failure(err: BaseException) -> str | None:
    """A short account of a failed hub request ("the hub answered HTTP 500 for URL", "the connection to
    ... failed: ..."), or None when ``err`` is not one."""
    status = http_status(err)
    if is_not_found(err):
        where = f" (HTTP {status[0]} for {status[1]})" if status else ""
        return f"not found on the hub{where}"
    if status is not None:
        return f"the hub answered HTTP {status[0]} for {status[1]}"
    for e in causes(err):
        if is_transfer_error(e):
            return f"the connection to {hub_endpoint()} failed ({type(e).__name__}: {e})"
        if isinstance(e, OSError) and e.errno is None and "Consistency check failed" in str(e):
            return "the transfer ended early (fewer bytes arrived than the hub announced)"
        if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return f"the hub at {hub_endpoint()} cannot be reached and the file is not in the cache"
    return None
