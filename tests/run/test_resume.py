"""Resumable and retry-safe route jobs: checkpoints, out-of-memory retries with a smaller batch, fail-fast retries."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from routelab.run import resume
from routelab.run.resume import OOM_EXIT_CODE, choose_batch_size, describe_exit, halve, is_out_of_memory, oom_kill_count
from tests.support import faults
from tests.support.route_setup import assert_same_run, load_route_script, make_model_and_data, read_run, route_args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir, data_dir = make_model_and_data(root)
    route = load_route_script()
    route.main(route_args(model_dir, data_dir, root / "clean"))  # batch size 4, no checkpoints
    return root, model_dir, data_dir, route, read_run(root / "clean")


def fault(monkeypatch, kind: str, after_batches: int, min_batch_size: int = 1) -> None:
    faults.install(monkeypatch)
    monkeypatch.setenv(faults.FAULT_ENV, json.dumps({"kind": kind, "after_batches": after_batches,
                                                     "min_batch_size": min_batch_size}))


def assert_identical(a: dict, b: dict) -> None:
    for name in ("routing.parquet", "decisions.parquet", "explorer.parquet", "scores.parquet"):
        assert a[name].equals(b[name]), name
    for name in ("metrics.json", "summary.json"):
        assert a[name] == b[name], name
    skip = {"git_commit"}
    assert {k: v for k, v in a["provenance.json"].items() if k not in skip} == \
        {k: v for k, v in b["provenance.json"].items() if k not in skip}


def test_batch_size_halves_down_to_one():
    assert [halve(n) for n in (16, 8, 5, 2, 1)] == [8, 4, 2, 1, 1]


def previous_attempt(root, attempt=1, batch_size=8, **fields):
    root.mkdir(parents=True, exist_ok=True)
    (root / "attempt.json").write_text(json.dumps({"attempt": attempt, "batch_size": batch_size, "oom_kills": None,
                                                   "slurm_job_id": None, **fields}))
    return root


def test_a_first_attempt_resumes_at_the_saved_chunks_batch_size(tmp_path):
    assert choose_batch_size(tmp_path, None, 8, 1, None) == (8, "attempt 1: batch size 8")
    # --rerun-incomplete after every attempt was killed: the chunks were made at 4, so the run goes on at 4
    previous_attempt(tmp_path, attempt=2, batch_size=4)
    assert choose_batch_size(tmp_path, 4, 8, 1, None) == (4, "attempt 1: the saved chunks' batch size 4")


def test_a_kill_without_memory_evidence_keeps_the_batch_size(tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "oom_kill_count", lambda: 3)
    root = previous_attempt(tmp_path, oom_kills=3)
    size, why = choose_batch_size(root, 8, 8, 2, "137")
    assert size == 8
    assert why == ("attempt 1 (batch size 8) killed by signal 9 (SIGKILL); no out-of-memory evidence; "
                   "attempt 2 resumes with the saved chunks' batch size 8")
    assert choose_batch_size(root, None, 8, 2, "1")[0] == 8  # an ordinary failure (fail-fast stops it anyway)


@pytest.mark.parametrize(("previous_exit", "record", "oom_kills_now", "slurm_state", "evidence"), [
    (str(OOM_EXIT_CODE), {}, None, None, "it ran out of memory"),
    ("1", {"ended": "out of memory"}, None, None, "it ran out of memory"),  # route.py's own record of the OOM
    ("137", {"oom_kills": 0}, 1, None, "the cgroup's memory.events oom_kill rose from 0 to 1"),
    ("unrecorded", {"oom_kills": 2}, 3, None, "the cgroup's memory.events oom_kill rose from 2 to 3"),
    ("137", {"slurm_job_id": "42"}, None, "OUT_OF_MEMORY", "SLURM job 42 ended OUT_OF_MEMORY"),
])
def test_memory_evidence_halves_the_previous_attempts_batch(tmp_path, monkeypatch, previous_exit, record,
                                                            oom_kills_now, slurm_state, evidence):
    monkeypatch.setattr(resume, "oom_kill_count", lambda: oom_kills_now)
    monkeypatch.setattr(resume, "slurm_job_state", lambda job_id: slurm_state if job_id == "42" else None)
    root = previous_attempt(tmp_path, batch_size=8, **record)
    size, why = choose_batch_size(root, 8, 8, 2, previous_exit)
    assert size == 4 and f"out of memory: {evidence}; attempt 2 runs with batch size 4" in why


def test_a_slurm_job_state_is_read_from_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'JobId=42 JobName=route JobState=OUT_OF_MEMORY Reason=OutOfMemory'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert resume.slurm_job_state("42") == "OUT_OF_MEMORY"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert resume.slurm_job_state("42") is None


def test_the_cgroup_oom_kill_count_is_read_from_memory_events(tmp_path, monkeypatch):
    relative = Path("/proc/self/cgroup").read_text().splitlines()
    own = next((line[3:].strip().lstrip("/") for line in relative if line.startswith("0::")), None)
    if own is None:
        pytest.skip("no cgroup v2 on this machine")
    (tmp_path / own).mkdir(parents=True, exist_ok=True)
    (tmp_path / own / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert oom_kill_count(tmp_path) == 2
    assert oom_kill_count(tmp_path / "absent") is None


def test_exit_statuses_are_described():
    assert describe_exit("137") == "killed by signal 9 (SIGKILL)"
    assert describe_exit("143") == "killed by signal 15 (SIGTERM)"
    assert describe_exit(str(OOM_EXIT_CODE)) == f"exit status {OOM_EXIT_CODE} (out of memory)"
    assert describe_exit("unrecorded").startswith("ended without a recorded exit status")


def test_out_of_memory_errors_are_recognised():
    try:  # a real host allocation failure (128 TiB)
        torch.empty(2**45, dtype=torch.float32)
    except RuntimeError as exc:
        assert is_out_of_memory(exc)
    else:
        pytest.skip("this machine allocated 128 TiB")
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator error


def test_interrupted_run_resumes_from_its_checkpoint_and_equals_an_uninterrupted_run(setup, monkeypatch, caplog):
    root, model_dir, data_dir, route, clean = setup
    out = root / "interrupted"
    args = route_args(model_dir, data_dir, out, checkpoint_every=2)
    fault(monkeypatch, "interrupt", after_batches=5)  # a kill in the 3rd chunk: chunks of batches 0-1, 2-3 saved
    with pytest.raises(KeyboardInterrupt):
        route.main(args)
    assert not out.exists() or not any(out.iterdir())  # no output looks finished
    chunks = sorted(p.name for p in (root / "interrupted.partial").glob("*/chunk-*"))
    assert chunks == ["chunk-000000000-000000008", "chunk-000000008-000000016"]
    assert not (root / "interrupted.partial" / "failed.json").exists()  # a kill is not an error

    monkeypatch.delenv("ROUTELAB_INJECT_FAULT")
    with caplog.at_level(logging.INFO, logger="route"):
        route.main(args)
    assert "windows 0-16 of 41 are done" in caplog.text
    assert "checkpoint: windows 0-8" not in caplog.text  # the saved chunks were not evaluated again
    assert_identical(read_run(out), clean)
    assert not (root / "interrupted.partial").exists()  # removed after success


def test_a_checkpoint_of_other_inputs_is_never_reused(setup, monkeypatch, caplog):
    root, model_dir, data_dir, route, clean = setup
    out = root / "stale"
    fault(monkeypatch, "interrupt", after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        route.main(route_args(model_dir, data_dir, out, checkpoint_every=1, sample_every=3))
    monkeypatch.delenv("ROUTELAB_INJECT_FAULT")
    # Another sampling interval: the saved chunks hold other decision rows, so they must not be used.
    with caplog.at_level(logging.INFO):
        route.main(route_args(model_dir, data_dir, out, checkpoint_every=2, sample_every=5))
    assert "deleting a stale checkpoint" in caplog.text and "resuming" not in caplog.text
    assert_identical(read_run(out), clean)


def test_out_of_memory_exits_for_a_retry_that_succeeds_with_half_the_batch(setup, monkeypatch, capsys):
    root, model_dir, data_dir, route, clean = setup
    out = root / "oom"
    fault(monkeypatch, "oom", after_batches=1, min_batch_size=8)  # batch size 8 runs out of memory at batch 1
    with pytest.raises(SystemExit) as exit_info:
        route.main(route_args(model_dir, data_dir, out, batch_size=8, checkpoint_every=1))
    assert exit_info.value.code == OOM_EXIT_CODE
    assert "out of memory at batch size 8" in capsys.readouterr().err
    assert not (root / "oom.partial" / "failed.json").exists()  # an OOM retry is allowed to run

    # The retry is given the configured batch size again; the attempt record says it ran out of memory.
    route.main(route_args(model_dir, data_dir, out, batch_size=8, checkpoint_every=1, attempt=2))
    # Windows 0-7 were saved at batch size 8 before the failure; the rest ran at 4, as the clean run.
    assert_same_run(read_run(out), clean, float_tol=1e-5)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["batch_size"] == 4
    windows = provenance["batch_sizes"][-1]["windows"][1]
    assert provenance["batch_sizes"][0] == {"windows": [0, 8], "batch_size": 8}
    assert {entry["batch_size"] for entry in provenance["batch_sizes"][1:]} == {4} and windows > 8


def test_out_of_memory_at_batch_size_one_is_not_retried(setup, monkeypatch):
    root, model_dir, data_dir, route, _ = setup
    fault(monkeypatch, "oom", after_batches=0)
    with pytest.raises(torch.OutOfMemoryError):
        route.main(route_args(model_dir, data_dir, root / "oom1", batch_size=1))
    assert (root / "oom1.partial" / "failed.json").is_file()


def test_a_retry_after_another_error_fails_at_once_with_the_first_error(setup, monkeypatch, capsys):
    root, model_dir, data_dir, route, clean = setup
    out = root / "broken"
    fault(monkeypatch, "error", after_batches=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        route.main(route_args(model_dir, data_dir, out))
    marker = json.loads((root / "broken.partial" / "failed.json").read_text())
    assert "injected failure" in marker["error"] and "Traceback" in marker["traceback"]

    # The retry (Snakemake attempt 2) must not load the model or evaluate anything.
    monkeypatch.delenv("ROUTELAB_INJECT_FAULT")
    from routelab.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the retry redid the work"))
    with pytest.raises(SystemExit) as exit_info:
        route.main(route_args(model_dir, data_dir, out, batch_size=2, attempt=2))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "not retrying" in err and "RuntimeError: injected failure" in err and "Traceback" in err

    # A new invocation (attempt 1, the bug fixed) runs normally and clears the marker.
    monkeypatch.undo()
    route.main(route_args(model_dir, data_dir, out))
    assert_identical(read_run(out), clean)
    assert not (root / "broken.partial").exists()
