"""Resumable, retry-safe route runs: checkpoints of completed windows, out-of-memory retries, failure markers.

A route job evaluates its windows in chunks of ``checkpoint_every`` batches. Each completed chunk is
saved atomically to the run's checkpoint directory ``{out}.partial/{key}/chunk-{start}-{end}/``
(its routing and decision rows, window scores, and the recorder state after it). A restarted job
skips the saved chunks and continues with the recorder state of the last one, so its outputs equal
those of an uninterrupted run. The directory is not a declared output (Snakemake deletes the outputs
of a failed job) and lies next to the run directory; ``key`` hashes everything that determines the
rows (routing, model, data, null, seed, sampling, shard) so a checkpoint of other inputs is never
reused: it is deleted. The batch size is not in the key: an out-of-memory retry with a smaller batch
continues the completed windows (batch size changes scores only at float rounding level).

Retries (Snakemake's ``retries:``): an out-of-memory error exits with :data:`OOM_EXIT_CODE`. Each
attempt records its batch size and the memory evidence at its start in ``{out}.partial/attempt.json``;
:func:`choose_batch_size` halves the batch for the next attempt only on evidence that the previous
one ran out of memory (that exit status, or a kill while the cgroup's OOM-kill count rose or SLURM
reports OUT_OF_MEMORY). Otherwise a resumed run continues at the batch size its saved chunks were
made with, so its outputs equal an uninterrupted run's byte for byte. The rule's wrapper
(``workflow/scripts/attempt.sh``) tells the job how the previous attempt ended
(:data:`PREVIOUS_EXIT_ENV`). Any other error writes ``{out}.partial/failed.json``; a retry attempt
that finds it exits at once, repeating the original error, instead of redoing the work (Snakemake
retries every failure). The first attempt of a new Snakemake invocation ignores and deletes an old
marker.

The tests inject these failures with a recorder of their own (``tests/support/faults.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from routelab.io.files import atomic_path, read_json, write_json

if TYPE_CHECKING:  # the Snakefile imports this module: keep torch and pandas out of its start-up
    import pandas as pd

log = logging.getLogger(__name__)

OOM_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: a temporary failure, worth retrying (with a smaller batch)
PREVIOUS_EXIT_ENV = "ROUTELAB_PREVIOUS_EXIT"  # set by attempt.sh: the previous attempt's exit status, or "unrecorded"
CGROUP_ROOT = Path("/sys/fs/cgroup")
_CHUNK_PREFIX = "chunk-"


def halve(batch_size: int) -> int:
    """The batch size after an out-of-memory failure: half, at least 1."""
    return max(1, int(batch_size) // 2)


def oom_kill_count(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's cgroup and the cgroups below
    it (cgroup v2 ``memory.events``); None where there is no cgroup v2 memory controller."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        (relative,) = [line[3:] for line in lines if line.startswith("0::")]
        events = (cgroup_root / relative.strip().lstrip("/") / "memory.events").read_text()
    except (OSError, ValueError):
        return None
    counts = dict(line.split() for line in events.splitlines() if line.strip())
    return int(counts["oom_kill"]) if "oom_kill" in counts else None


def slurm_job_state(job_id: str) -> str | None:
    """SLURM's state of job ``job_id`` (e.g. OUT_OF_MEMORY), from ``scontrol`` while the controller still
    holds the finished job (MinJobAge, 300 s by default); None when it cannot tell."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                               timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bJobState=(\S+)", shown)
    return match.group(1) if match else None


def describe_exit(status: str | None) -> str:
    """How an attempt ended, from its shell's exit status (128 + N: killed by signal N)."""
    if status is None or status == "unrecorded":
        return "ended without a recorded exit status (its shell was killed too: preemption, node failure or OOM)"
    code = int(status)
    if code > 128 and code - 128 in {s.value for s in signal.Signals}:
        return f"killed by signal {code - 128} ({signal.Signals(code - 128).name})"
    if code == OOM_EXIT_CODE:
        return f"exit status {code} (out of memory)"
    return f"exit status {code}"


def choose_batch_size(root: Path, chunks_batch_size: int | None, configured: int, attempt: int,
                      previous_exit: str | None) -> tuple[int, str]:
    """The batch size attempt ``attempt`` runs with, and why (a line for the job's log).

    ``root``: the run's ``{out}.partial`` (its ``attempt.json`` is the previous attempt's record);
    ``chunks_batch_size``: the batch size of the last saved chunk (None: none saved); ``previous_exit``:
    the previous attempt's exit status as the wrapper recorded it. The batch is halved only on evidence
    that the previous attempt ran out of memory; otherwise the saved chunks' batch size is kept.
    """
    record = read_json(root / "attempt.json") if (root / "attempt.json").is_file() else None
    keep = chunks_batch_size or (record["batch_size"] if record else configured)
    resumed = f"the saved chunks' batch size {keep}" if chunks_batch_size else f"batch size {keep}"
    if attempt == 1 or record is None:
        return keep, f"attempt {attempt}: {resumed}"
    ended = describe_exit(previous_exit)
    killed = previous_exit in (None, "unrecorded") or int(previous_exit) > 128
    evidence = None
    if record.get("ended") == "out of memory" or previous_exit == str(OOM_EXIT_CODE):
        evidence = "it ran out of memory"
    elif killed:
        before, now = record.get("oom_kills"), oom_kill_count()
        if before is not None and now is not None and now > before:
            evidence = f"the cgroup's memory.events oom_kill rose from {before} to {now}"
        elif record.get("slurm_job_id") and slurm_job_state(record["slurm_job_id"]) == "OUT_OF_MEMORY":
            evidence = f"SLURM job {record['slurm_job_id']} ended OUT_OF_MEMORY"
    previous = f"attempt {record['attempt']} (batch size {record['batch_size']}) {ended}"
    if evidence:
        smaller = halve(record["batch_size"])
        return smaller, f"{previous}; out of memory: {evidence}; attempt {attempt} runs with batch size {smaller}"
    return keep, f"{previous}; no out-of-memory evidence; attempt {attempt} resumes with {resumed}"


def record_attempt(root: Path, attempt: int, batch_size: int) -> None:
    """``attempt.json``: this attempt's batch size and what the next attempt compares to tell an OOM kill."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "attempt.json", {"attempt": attempt, "batch_size": batch_size, "pid": os.getpid(),
                                       "oom_kills": oom_kill_count(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (``torch.OutOfMemoryError``) or host (allocator RuntimeError, ``MemoryError``) out-of-memory error."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def fingerprint(path: str | os.PathLike | None) -> Any:
    """What identifies an input: a file's SHA-256, a directory's (name, bytes, mtime) listing, else the string."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    if p.is_dir():
        # Model weights can be many GB: their size and modification time stand in for their content.
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]
    return str(path)


@dataclass(frozen=True)
class Chunk:
    """A saved chunk: windows ``[start, end)`` of the run (or shard) and its directory."""

    start: int
    end: int
    path: Path


class Checkpoint:
    """The checkpoint directory of one run output directory ``out``, for the inputs hashed into ``key``."""

    def __init__(self, out: str | os.PathLike, key: dict[str, Any]):
        self.root = Path(f"{Path(out)}.partial")
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = self.root / digest
        self.failure_marker = self.root / "failed.json"

    def open(self) -> list[Chunk]:
        """Create the directory, delete checkpoints of other inputs; the saved chunks, in order."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for other in self.root.iterdir():
            if other.is_dir() and other != self.dir:
                log.info("deleting a stale checkpoint (other inputs): %s", other)
                shutil.rmtree(other, ignore_errors=True)
        return self.chunks()

    def chunks(self) -> list[Chunk]:
        """Completed chunks from window 0 on; a gap (never expected) ends the list."""
        found = []
        for entry in self.dir.iterdir() if self.dir.is_dir() else ():
            if entry.is_dir() and entry.name.startswith(_CHUNK_PREFIX):  # interrupted writes are hidden .tmp dirs
                start, end = (int(x) for x in entry.name[len(_CHUNK_PREFIX):].split("-"))
                found.append(Chunk(start, end, entry))
        chunks, position = [], 0
        for chunk in sorted(found, key=lambda c: c.start):
            if chunk.start != position:
                break
            chunks.append(chunk)
            position = chunk.end
        return chunks

    @contextlib.contextmanager
    def write_chunk(self, start: int, end: int) -> Iterator[Path]:
        """A directory for chunk ``[start, end)``; it appears under its final name only if the block succeeds."""
        with atomic_path(self.dir / f"{_CHUNK_PREFIX}{start:09d}-{end:09d}") as tmp:
            tmp.mkdir()
            yield tmp

    def remove(self) -> None:
        """Delete the whole checkpoint directory (after the run's outputs are written)."""
        shutil.rmtree(self.root, ignore_errors=True)


_CHUNK_FIELDS = ("tokens_seen", "seconds", "batch_size")


def save_chunk_state(chunk_dir: Path, recorder_state: dict[str, np.ndarray], tokens_seen: int,
                     seconds: float, window_scores: pd.DataFrame, batch_size: int) -> None:
    """Save what a resumed run needs after a chunk: recorder state (cumulative), sampler counter, compute
    time, and the batch size the chunk was evaluated at."""
    from routelab.io.files import write_parquet

    write_parquet(chunk_dir / "window_scores.parquet", window_scores)
    np.savez(chunk_dir / "state.npz", **recorder_state, tokens_seen=np.int64(tokens_seen), seconds=np.float64(seconds),
             batch_size=np.int64(batch_size))


def load_chunk_state(chunk: Chunk) -> tuple[dict[str, np.ndarray], int, float]:
    """``(recorder state, sampler tokens seen, compute seconds)`` after ``chunk`` (cumulative)."""
    with np.load(chunk.path / "state.npz") as saved:
        state = {name: saved[name] for name in saved.files if name not in _CHUNK_FIELDS}
        return state, int(saved["tokens_seen"]), float(saved["seconds"])


def chunk_batch_size(chunk: Chunk) -> int:
    """The batch size ``chunk`` was evaluated at."""
    with np.load(chunk.path / "state.npz") as saved:
        return int(saved["batch_size"])


@contextlib.contextmanager
def retry_guard(marker: Path, attempt: int, batch_size: int) -> Iterator[None]:
    """Run a route job's work: fail fast on a retry after a non-memory error, exit for a retry on OOM.

    Attempt 1 deletes an old marker. A later attempt that finds one exits with status 1 at once,
    printing the first failure. An out-of-memory error with ``batch_size > 1`` exits with
    :data:`OOM_EXIT_CODE`; any other exception (or OOM at batch size 1) writes the marker and propagates.
    """
    if attempt > 1 and marker.is_file():
        failure = read_json(marker)
        message = (f"not retrying: attempt {failure['attempt']} failed with an error that is not out of memory, "
                   f"so another attempt would fail the same way.\nThe first failure: {failure['error']}\n"
                   f"{failure['traceback']}")
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)
    if attempt == 1:
        marker.unlink(missing_ok=True)
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc) and batch_size > 1:
            message = (f"out of memory at batch size {batch_size} ({type(exc).__name__}: {str(exc)[:300]}); "
                       f"exit status {OOM_EXIT_CODE} so that the retry runs with batch size {halve(batch_size)}")
            attempt_record = marker.parent / "attempt.json"
            if attempt_record.is_file():
                write_json(attempt_record, {**read_json(attempt_record), "ended": "out of memory"})
            log.error("%s", message)
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(OOM_EXIT_CODE) from None
        write_json(marker, {"attempt": attempt, "batch_size": batch_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        raise
