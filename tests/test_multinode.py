"""Failure and multi-node behaviour of FSDP runs through the real launcher (gloo on CPU, fp32):

- kill -9 of one rank mid-run: torchrun notices, stops the other rank and exits non-zero within a bounded time (no
  hang, no worker left behind); a rerun resumes from the last sharded checkpoint and ends with exactly the weights
  of an uninterrupted run.
- two node agents (`torchrun --nnodes=2 --nproc-per-node=2`, c10d rendezvous on 127.0.0.1) make one 4-rank run
  whose losses equal one process's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.test_ddp import ROOT, run_stage
from tests.test_fsdp import PRESETS, assert_same_training, prepare, val_losses
from tests.test_train_stage import workspace  # noqa: F401  (a fixture)

TEARDOWN_SECONDS = 90  # torchrun's grace before SIGKILL is 30 s; gloo usually fails the survivor at once


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_kill_one_rank_then_resume_equals_uninterrupted(workspace, tmp_path):  # noqa: F811
    train = {"schedule": "constant", "max_steps": 40, "checkpoint_every": 10, "eval_every": 10, "parallel": "fsdp"}
    whole = prepare(workspace, tmp_path / "whole", PRESETS["tiny"], **train)
    run_stage(whole, 2)
    killed = prepare(workspace, tmp_path / "killed", PRESETS["tiny"], **train)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=0", "-m", "stages.train"]
    proc = subprocess.Popen(launcher, cwd=killed, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(killed / "data/checkpoints/step-000010/state.json", proc, timeout=240)
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=TEARDOWN_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    torn_down = time.monotonic() - killed_at
    assert proc.returncode != 0, output[-3000:]
    assert not any(_alive(pid) for pid in workers.values()), "a worker outlived torchrun"
    assert not (killed / "data/checkpoints/step-000040").exists()  # it really stopped mid-run
    assert not (killed / "data/model").exists()
    print(f"torchrun exited {proc.returncode} {torn_down:.1f} s after kill -9 of rank 1")
    run_stage(killed, 2)  # resumes from the newest intact sharded checkpoint
    assert val_losses(killed) == val_losses(whole)
    one = safetensors.torch.load_file(whole / "data/model/model.safetensors")
    two = safetensors.torch.load_file(killed / "data/model/model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(root: Path) -> list[float]:
    rows = (root / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


@pytest.mark.slow
def test_two_node_agents_rendezvous_equals_one_process(workspace, tmp_path):  # noqa: F811
    # global batch 8 windows: 4 ranks x 2, or one process x 2 x 4 accumulation micro-steps
    train = {"max_steps": 10, "batch_size": 2}
    single = prepare(workspace, tmp_path / "single", PRESETS["qwen3-style"], **train)
    multi = prepare(workspace, tmp_path / "multi", PRESETS["qwen3-style"], parallel="fsdp", **train)
    run_stage(single, 1)
    port, run_id = _free_port(), f"test-{uuid.uuid4().hex[:8]}"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
             "--max-restarts=0", "-m", "stages.train"]
    nodes = [subprocess.Popen(agent, cwd=multi, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    state = json.loads((multi / "data/checkpoints/step-000010/state.json").read_text())
    assert state["data"]["world_size"] == 4 and len([f for f in state["files"] if f.startswith("shards/")]) == 4
    losses_one, losses_four = _train_losses(single), _train_losses(multi)
    assert len(losses_one) == len(losses_four) >= 2
    for x, y in zip(losses_one, losses_four):
        assert abs(x - y) <= 1e-5 * abs(x), (losses_one, losses_four)
    assert_same_training(single, multi)
