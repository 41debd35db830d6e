"""DDP through the real launcher: `torchrun --nproc_per_node=2 -m stages.train` (gloo on CPU) with a per-rank batch
of B/2 must train the same model as one process with batch B (same windows: the shard reader hands each rank its
slice of the global batch; DDP averages the gradients)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.test_train_stage import workspace, write_params  # noqa: F401  (workspace is a fixture)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 6, "seq_len": 32, "eval_every": 3, "checkpoint_every": 3, "warmup_steps": 2, "lr": 3.0e-3}


def run_stage(workdir: Path, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "stages.train"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_global_batch(workspace, tmp_path):  # noqa: F811
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for target, batch in ((single, 8), (ddp, 4)):
        shutil.copytree(workspace / "data/tokenizer", target / "data/tokenizer")
        shutil.copytree(workspace / "data/shards", target / "data/shards")
        write_params(target, train={**TRAIN, "batch_size": batch})
    run_stage(single, 1)
    run_stage(ddp, 2)
    one = safetensors.torch.load_file(single / "data/model/model.safetensors")
    two = safetensors.torch.load_file(ddp / "data/model/model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=2e-5, msg=key)
    # only rank 0 wrote checkpoints and metrics, and they record the world size
    assert sorted(p.name for p in (ddp / "data/checkpoints").iterdir()) == ["step-000003", "step-000006"]
    state = (ddp / "data/checkpoints/step-000006/state.json").read_text()
    assert '"world_size": 2' in state
