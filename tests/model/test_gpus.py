"""GPU pinning: concurrent jobs get distinct devices through file locks; without GPUs nothing changes.

The concurrency tests start real processes (``flock`` locks are what separate jobs), each
given a fake list of devices through ``CUDA_VISIBLE_DEVICES``; no GPU is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from routelab.model import gpus

# Pins, reports the device and what CUDA_VISIBLE_DEVICES became, then holds the lock until stdin closes.
HOLDER = """
import os, sys
from routelab.model.gpus import pin_gpu
device = pin_gpu(lock_dir=sys.argv[1], timeout=float(sys.argv[2]))
print(device, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
sys.stdin.read()
"""


def start_holder(lock_dir, devices: str | None, timeout: float = 20) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(timeout)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pinned(proc: subprocess.Popen) -> list[str]:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return line.split()


def finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_concurrent_jobs_get_distinct_devices(tmp_path):
    holders = [start_holder(tmp_path, "0,1,2") for _ in range(3)]
    try:
        got = [pinned(p) for p in holders]
    finally:
        for p in holders:
            finish(p)
    assert sorted(device for device, _ in got) == ["0", "1", "2"]
    assert all(device == visible for device, visible in got), got  # the process sees only its device


def test_a_job_waits_when_all_devices_are_taken_and_gets_one_when_released(tmp_path):
    first, second = start_holder(tmp_path, "0,1"), start_holder(tmp_path, "0,1")
    first_device, second_device = pinned(first)[0], pinned(second)[0]
    assert {first_device, second_device} == {"0", "1"}
    third = start_holder(tmp_path, "0,1", timeout=0.5)
    assert third.wait(timeout=30) != 0
    assert "TimeoutError" in third.stderr.read()
    # The lock dies with its process: once the first holder ends, a new job gets exactly its device.
    finish(first)
    fourth = start_holder(tmp_path, "0,1")
    try:
        assert pinned(fourth)[0] == first_device
    finally:
        finish(fourth)
        finish(second)


def test_uuid_and_mig_entries_are_kept_verbatim(tmp_path):
    devices = "GPU-8f2c1e3a-aaaa-bbbb-cccc-000000000001,MIG-1a2b3c4d-0000-1111-2222-333333333333"
    holders = [start_holder(tmp_path, devices) for _ in range(2)]
    try:
        got = {pinned(p)[0] for p in holders}
    finally:
        for p in holders:
            finish(p)
    assert got == set(devices.split(","))


def test_no_gpu_leaves_the_environment_unchanged(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert gpus.pin_gpu(lock_dir=tmp_path) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not list(tmp_path.iterdir())  # no lock taken


def test_empty_device_list_means_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.pin_gpu(lock_dir=tmp_path) is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_a_single_visible_device_is_used_as_is(tmp_path, monkeypatch):
    """A SLURM job with --gpus=1 already sees one device: nothing to choose, nothing to lock."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert gpus.pin_gpu(lock_dir=tmp_path) == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not list(tmp_path.iterdir())


def test_devices_come_from_nvidia_smi_when_the_variable_is_unset(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpus.visible_gpus() == ["0", "1"]
    try:
        assert gpus.pin_gpu(lock_dir=tmp_path / "locks") == "0"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    finally:
        gpus.release()
