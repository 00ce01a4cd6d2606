"""Who may work on a run folder, and on each of its cells.

* `FolderLock`: one ``dpt-bench`` process at a time runs (or submits) a grid into a run folder.
  An OS file lock (``flock``) on ``<folder>/.lock``: the system releases it when the process ends,
  however it ends. A second process exits with a message naming the holder, or waits for it.
* `CellClaim`: one process at a time runs a cell, whether it is a local worker, a SLURM array task
  or another ``dpt-bench``. A claim is a file ``runs/<run id>/.claim.<n>`` created exclusively
  (an atomic hard link: one creator wins, on NFS too). The holder touches it every few seconds.
  A claim is stale, and the next claimant takes over with claim ``n + 1``, when its process is
  gone (same host: the pid no longer runs, or runs another program), when its heartbeat is older
  than `STALE_AFTER` seconds (another host), or when it belongs to this same scheduler task (a
  requeued array task finding its previous life's claim; only tasks pass their identity). After taking a claim, the holder checks the
  cell's result again, so a cell finished meanwhile is never run twice.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from dpt_lightning.files import atomic_write

#: Seconds without a heartbeat after which another host's claim is taken over
#: (``$DPT_BENCH_STALE_AFTER``); the holder touches its claim every ``STALE_AFTER / 10`` seconds.
STALE_AFTER = float(os.environ.get("DPT_BENCH_STALE_AFTER", 600))


class FolderBusy(RuntimeError):
    """Another dpt-bench process holds the run folder."""


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as the kernel counts it (``/proc/<pid>/stat``), to tell a
    living process from a new one that reuses its pid; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return started is None or process_start(pid) in (None, started)


def job_identity() -> str:
    """The scheduler task this process runs as (SLURM array task, SLURM job, submitit local
    job), or "" outside any scheduler. A requeued task keeps its identity."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"submitit-local:{env['SUBMITIT_LOCAL_JOB_ID']}"
    return ""


def holder_info(job: str = "") -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_started": process_start(pid), "job": job,
            "since": _now(), "command": " ".join(sys.argv)[:500], "token": uuid.uuid4().hex}


# -------------------------------------------------------------------------- the folder
class FolderLock:
    """Exclusive use of a run folder by one dpt-bench process (see the module docstring)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return (f"dpt-bench pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
                f"({info.get('command', '')})")

    def acquire(self, wait: bool = False, stream=None) -> FolderLock:
        """Take the lock; if another process holds it: wait (``wait``) or raise `FolderBusy`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_lock(fd):
                message = (f"run folder {self.path.parent} is in use by {self.holder()}: two processes would run "
                           "the same cells")
                if not wait:
                    raise FolderBusy(f"{message}. Wait for it to finish (or stop it), pass --wait-lock to wait, or "
                                     "--new to start another run folder")
                print(f"dpt-bench: {message}; waiting for it to finish (--wait-lock)", file=stream or sys.stderr,
                      flush=True)
                _lock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
except ImportError:  # Windows: lock the first byte
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(1.0)


class SharedLock(FolderLock):
    """A short exclusive section that waits (the collector: two collectors never interleave)."""

    def __init__(self, folder: Path, name: str = ".collect.lock"):
        super().__init__(folder)
        self.path = Path(folder) / name

    def __enter__(self) -> SharedLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        _lock(fd)
        self._fd = fd
        return self


# ---------------------------------------------------------------------------- the cells
class CellClaim:
    """The right to run one cell (see the module docstring). ``acquire`` returns False when a
    live process holds the cell; ``release`` removes the claim."""

    def __init__(self, directory: Path, stale_after: float | None = None, job: str = ""):
        self.directory = Path(directory)
        self.job = job  # a scheduler task's identity (`job_identity`); "" for local processes
        self.stale_after = STALE_AFTER if stale_after is None else stale_after
        self.path: Path | None = None
        self.info: dict | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def claims(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob(".claim.*"):
            suffix = path.name[len(".claim."):]
            if suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def holder(self) -> dict | None:
        """The live claim's holder, or None when the cell is free (no claim, or a stale one)."""
        found = self.claims()
        if not found:
            return None
        info = _read_claim(found[-1][1])
        return None if info is None or self.is_stale(found[-1][1], info) else info

    def is_stale(self, path: Path, info: dict) -> bool:
        if self.job and info.get("job") == self.job:
            return True  # this same scheduler task, requeued: its previous life has ended
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not pid_alive(info["pid"], info.get("pid_started"))
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after

    def acquire(self, dead: frozenset[int] = frozenset()) -> bool:
        """Claim the cell. ``dead``: pids of this host known to have ended whose claims count as
        stale even before their parent reaps them (a dead worker's cell, taken over by its pool)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        found = self.claims()
        number = 0
        if found:
            top_number, top = found[-1]
            info = _read_claim(top)
            taken_over = info is not None and info.get("host") == socket.gethostname() and info.get("pid") in dead
            if info is not None and not taken_over and not self.is_stale(top, info):
                return False
            if info is None and _young(top, self.stale_after):  # being written right now
                return False
            number = top_number + 1
        info = holder_info(self.job)
        path = self.directory / f".claim.{number}"
        try:
            atomic_write(path, json.dumps(info), exclusive=True)
        except FileExistsError:
            return False  # another process took it first
        self.path, self.info = path, info
        for _, old in found:  # stale claims of earlier holders
            old.unlink(missing_ok=True)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="dpt-bench-claim", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        interval = max(0.5, min(30.0, self.stale_after / 10))
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = self.info = None


def _read_claim(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _young(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < min(seconds, 60)
    except FileNotFoundError:
        return False


def release_claims_of(directory: Path, pids: set[int]) -> None:
    """Remove the claims of processes of this host that are known to be gone (a dead worker)."""
    host = socket.gethostname()
    for _, path in CellClaim(directory).claims():
        info = _read_claim(path)
        if info and info.get("host") == host and info.get("pid") in pids and not pid_alive(info["pid"]):
            path.unlink(missing_ok=True)
