"""Resumable and retry-safe route jobs: checkpoints, out-of-memory retries with a smaller batch, fail-fast retries."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from routelab.run.resume import OOM_EXIT_CODE, batch_size_for_attempt, is_out_of_memory
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
    for name in ("routing.parquet", "decisions.parquet", "scores.parquet"):
        assert a[name].equals(b[name]), name
    for name in ("metrics.json", "summary.json"):
        assert a[name] == b[name], name
    skip = {"git_commit"}
    assert {k: v for k, v in a["provenance.json"].items() if k not in skip} == \
        {k: v for k, v in b["provenance.json"].items() if k not in skip}


def test_batch_size_halves_per_attempt_down_to_one():
    assert [batch_size_for_attempt(16, a) for a in range(1, 7)] == [16, 8, 4, 2, 1, 1]
    assert batch_size_for_attempt(1, 3) == 1 and batch_size_for_attempt(5, 2) == 2
    with pytest.raises(ValueError, match="attempt: 0"):
        batch_size_for_attempt(8, 0)


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
        route.main(route_args(model_dir, data_dir, out, batch_size=batch_size_for_attempt(8, 1), checkpoint_every=1))
    assert exit_info.value.code == OOM_EXIT_CODE
    assert "out of memory at batch size 8" in capsys.readouterr().err
    assert not (root / "oom.partial" / "failed.json").exists()  # an OOM retry is allowed to run

    route.main(route_args(model_dir, data_dir, out, batch_size=batch_size_for_attempt(8, 2), checkpoint_every=1,
                          attempt=2))
    # Windows 0-7 were saved at batch size 8 before the failure; the rest ran at 4, as the clean run.
    assert_same_run(read_run(out), clean, float_tol=1e-5)
    assert json.loads((out / "provenance.json").read_text())["batch_size"] == 4


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
    from routelab.run import route as route_job

    monkeypatch.setattr(route_job, "load_model", lambda *a, **k: pytest.fail("the retry redid the work"))
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
