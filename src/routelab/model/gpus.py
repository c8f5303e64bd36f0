"""Pin a process to one GPU: pick a free device with an exclusive file lock and set ``CUDA_VISIBLE_DEVICES``.

Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once but does not say which device
each job gets, and it never sets ``CUDA_VISIBLE_DEVICES``: without pinning, every job lands on device 0.
:func:`pin_gpu` runs at the start of a GPU script, before anything initialises CUDA. It takes the
devices this process may see (``CUDA_VISIBLE_DEVICES`` when set, else the devices ``nvidia-smi``
lists), locks the first one no other process holds (``flock`` on ``<lock_dir>/gpu-<device>.lock``)
and restricts the process to it. The kernel drops the lock when the process exits, however it exits,
so a crashed job never leaves a device marked busy. Without GPUs it changes nothing.

Under SLURM (``--gpus=1``) the job already sees exactly one device, and pinning is a no-op.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "ROUTELAB_GPU_LOCK_DIR"

# Open lock files of this process, kept referenced so the locks live as long as the process.
_held: dict[str, int] = {}


def default_lock_dir() -> Path:
    """``$ROUTELAB_GPU_LOCK_DIR``, else a per-user folder in the system temp dir (shared by all runs of the user)."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"routelab-gpu-locks-{os.getuid()}"


def visible_gpus() -> list[str]:
    """The devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices, ``GPU-<uuid>`` or MIG ids).

    ``CUDA_VISIBLE_DEVICES`` wins when set (an empty value means no GPU); otherwise the indices
    ``nvidia-smi`` reports, or none when it is missing or fails. CUDA itself is not touched: once a
    process has initialised CUDA, changing ``CUDA_VISIBLE_DEVICES`` has no effect.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s): treating this machine as having no GPU", exc)
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # Who holds it, for a person looking at the lock folder; the lock itself is the flock.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def pin_gpu(lock_dir: str | os.PathLike | None = None, timeout: float | None = None,
            poll: float = 0.5, count: int = 1) -> str | None:
    """Restrict this process to ``count`` free GPUs (default one) and return its ``CUDA_VISIBLE_DEVICES``.

    - no GPU visible: returns None, the environment is unchanged;
    - at most ``count`` visible (e.g. a SLURM job with ``--gpus=N``): returns them without locking;
    - more: locks the first ``count`` free ones in ``lock_dir`` (default :func:`default_lock_dir`), sets
      ``CUDA_VISIBLE_DEVICES`` to them and keeps the locks until the process exits (or :func:`release`).
      When too few are free (more GPU jobs than ``--resources gpu=N`` allows, or none given), it waits,
      polling every ``poll`` seconds; after ``timeout`` seconds (None: wait forever) it raises
      ``TimeoutError``. A model spread over several GPUs (``model.device_map``) asks for ``count`` > 1.

    Call it before anything initialises CUDA (loading a model on ``cuda``, ``torch.cuda.*``).
    """
    if _held:  # already pinned: the environment says to which devices
        return os.environ["CUDA_VISIBLE_DEVICES"]
    devices = visible_gpus()
    if len(devices) <= count:
        return ",".join(devices) if devices else None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise RuntimeError("pin_gpu() was called after CUDA was initialised; call it at the start of the script")
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting_logged = False
    while True:
        locked: dict[str, int] = {}
        for device in devices:
            fd = _try_lock(folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock")
            if fd is not None:
                locked[device] = fd
                if len(locked) == count:
                    _held.update(locked)
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(locked)
                    log.info("pinned to GPU %s (of %s; locks in %s)", ",".join(locked), ",".join(devices), folder)
                    return os.environ["CUDA_VISIBLE_DEVICES"]
        for fd in locked.values():  # too few free: give back the partial set so two jobs cannot deadlock
            os.close(fd)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"fewer than {count} free GPU(s) among CUDA_VISIBLE_DEVICES={','.join(devices)} "
                               f"after {timeout} s (locks in {folder}); run with --resources gpu=N, N at most the "
                               "number of GPUs")
        if not waiting_logged:
            log.warning("fewer than %d of %d GPUs are free; waiting for other jobs to release them", count,
                        len(devices))
            waiting_logged = True
        time.sleep(poll)


def release() -> None:
    """Give back the device this process pinned (it is released at exit anyway)."""
    for device, fd in list(_held.items()):
        os.close(fd)
        del _held[device]
