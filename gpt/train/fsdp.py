"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied from outside the model, as torchtitan does: each block is
sharded on its own (its parameters are all-gathered just before its forward and freed after), then the root takes
what is left (embeddings, final norm, head). Checkpoints keep the project's one format: the full, unsharded model and
optimizer state are gathered on rank 0 (torch.distributed.checkpoint.state_dict, full_state_dict + cpu_offload) and
written by gpt/train/checkpoints.py exactly as a single process writes them, so a checkpoint written by N ranks
resumes on M ranks (or on one process) and the final export is the same safetensors directory.

Optimizer state travels by parameter index (torch's own `optimizer.state_dict()` layout); `fqn_order` maps those
indices to the parameter names (FQNs) that the distributed state-dict API speaks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from gpt.train.device import Precision

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block: keep only each block's input, recompute its inside during backward.
    The forward is wrapped in place (not a wrapper module), so parameter names and checkpoints don't change."""
    for block in model.blocks:
        forward = block.forward

        def recomputed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed


def mixed_precision(precision: Precision, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute copies of the parameters with fp32 gradient reduction on CUDA bf16; else plain fp32."""
    if precision.name == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """fully_shard every block, then the root, over a 1-D mesh of all ranks. Returns the same (now sharded) model."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(precision, device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def fqn_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer index (index = position over the param groups, as in state_dict())."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def to_fqn_keys(state_dict: dict[str, Any], fqns: list[str]) -> dict[str, Any]:
    groups = [{**g, "params": [fqns[i] for i in g["params"]]} for g in state_dict["param_groups"]]
    return {"state": {fqns[i]: v for i, v in state_dict["state"].items()}, "param_groups": groups}


def to_index_keys(state_dict: dict[str, Any], fqns: list[str]) -> dict[str, Any]:
    index = {name: i for i, name in enumerate(fqns)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state_dict["param_groups"]]
    state = {index[name]: v for name, v in state_dict["state"].items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any],
                         fqns: list[str]) -> None:
    """Set the sharded optimizer from a full index-keyed state dict that every rank holds (each keeps its shard)."""
    if full["state"]:
        set_optimizer_state_dict(model, optimizer, to_fqn_keys(full, fqns),
                                 options=StateDictOptions(full_state_dict=True))


class GatheredOptimizer:
    """The full optimizer state gathered on rank 0, shaped like an optimizer for CheckpointManager.save (which
    only calls `state_dict()`)."""

    def __init__(self, state_dict: dict[str, Any]):
        self._state_dict = state_dict

    def state_dict(self) -> dict[str, Any]:
        return self._state_dict


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fqns: list[str],
                      full_model: nn.Module | None) -> GatheredOptimizer | None:
    """Collective (every rank calls it): gather weights and optimizer state onto rank 0's CPU. Rank 0 copies the
    weights into `full_model` (its plain CPU replica) and gets the optimizer state back; other ranks get None."""
    weights = get_model_state_dict(model, options=FULL_ON_CPU)
    optim = get_optimizer_state_dict(model, optimizer, options=FULL_ON_CPU)
    if full_model is None:
        return None
    full_model.load_state_dict(weights)
    return GatheredOptimizer(to_index_keys(optim, fqns))


def cpu_replica(model: nn.Module) -> nn.Module:
    """A plain CPU copy of the unsharded model (rank 0 writes checkpoints and the final export from it)."""
    return copy.deepcopy(model).to("cpu")
