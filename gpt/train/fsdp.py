"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied from outside the model, as torchtitan does: each block is
sharded on its own (its parameters are all-gathered just before its forward and freed after), then the root takes
what is left (embeddings, final norm, head).

Checkpoints are sharded: every rank writes its own shard of the weights and optimizer state through
torch.distributed.checkpoint (DCP) in DCP's safetensors layout (`HuggingFaceStorageWriter(save_distributed=True)`:
one `shards/shard-<rank+1>-model-00001-of-00001.safetensors` per rank, each tensor's offset in the full tensor in
the file's safetensors metadata; no pickle anywhere). Loading reads the pieces every local shard overlaps, so a
checkpoint written by N ranks resumes on M ranks (reshard on load) or on one process (full tensors). What goes in:
`model.<fqn>` for each parameter and persistent buffer (tied weights once), `optimizer.<fqn>.<name>` for each
tensor of optimizer state shaped like its parameter; the 0-d tensors (AdamW's step), plain scalars and the
param-group hyper-parameters go in the checkpoint's state.json (gpt/train/checkpoints.py writes it, with the size
and sha256 of every shard file, so damaged shards are detected like any other checkpoint file). The final model is
still exported whole: `gather_full_weights` all-gathers the weights into rank 0's plain CPU replica.

DCP on several machines needs the checkpoint directory on a filesystem every rank can write (NFS, Lustre, a
mounted bucket): each rank writes its own file into the same directory.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from gpt.train.device import Precision

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)
SHARDS_DIR = "shards"  # inside a checkpoint directory: one safetensors file per rank that wrote it


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


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any],
                         fqns: list[str]) -> None:
    """Set the sharded optimizer from a full index-keyed state dict that every rank holds (each keeps its shard):
    how a consolidated checkpoint (written by one process) continues under FSDP."""
    if full["state"]:
        set_optimizer_state_dict(model, optimizer, to_fqn_keys(full, fqns),
                                 options=StateDictOptions(full_state_dict=True))


def gather_full_weights(model: nn.Module, full_model: nn.Module | None) -> None:
    """Collective (every rank calls it): all-gather the weights onto rank 0's CPU replica `full_model` (None on the
    other ranks), for the final safetensors export."""
    weights = get_model_state_dict(model, options=FULL_ON_CPU)
    if full_model is not None:
        full_model.load_state_dict(weights)


def cpu_replica(model: nn.Module) -> nn.Module:
    """A plain CPU copy of the unsharded model (rank 0 writes the final export from it)."""
    return copy.deepcopy(model).to("cpu")


# ---------------------------------------------------------------- sharded checkpoints (DCP)
def _resharded(model: nn.Module) -> nn.Module:
    """Every FSDP module back to its sharded parameters: a forward without backward (validation) leaves the root's
    parameters all-gathered, and then `named_parameters()` names those, not the sharded ones the optimizer holds."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once, under their first name) and persistent buffers, by state-dict name; DTensors
    under FSDP, plain tensors otherwise — the same names either way (fully_shard keeps them)."""
    keys = set(model.state_dict())
    return {name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if name in keys}


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns that it 'assumes' a single process when no process group is up; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: every rank writes its shard of the weights and optimizer tensors into `directory` (DCP,
    safetensors). Returns the JSON-safe rest of the optimizer state for state.json (same on every rank)."""
    names = {id(p): name for name, p in _resharded(model).named_parameters()}
    tensors = {f"model.{name}": t.detach() for name, t in _weights(model).items()}
    state_tensors: dict[str, list[str]] = {}
    zero_dim: dict[str, dict[str, Any]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    tensors[f"optimizer.{name}.{key}"] = value.detach()
                    state_tensors.setdefault(name, []).append(key)
                elif isinstance(value, torch.Tensor):  # AdamW's step: the same on every rank
                    zero_dim.setdefault(name, {})[key] = {"value": value.item(), "dtype": _dtype_name(value.dtype)}
                else:
                    scalars.setdefault(name, {})[key] = value
    with _one_process_is_fine():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True),
                 no_dist=not dist.is_initialized())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"param_groups": groups, "tensors": state_tensors, "zero_dim": zero_dim, "scalars": scalars}


def read_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                meta: dict[str, Any]) -> None:
    """Load a sharded checkpoint into this process's model and optimizer, whatever their layout: FSDP shards over
    any number of ranks (each reads the pieces its shard overlaps) or plain full tensors (one process or DDP).
    Collective when a process group is up (every rank calls it)."""
    params = dict(_resharded(model).named_parameters())
    targets = {f"model.{name}": t.detach() for name, t in _weights(model).items()}
    if optimizer is not None:
        saved_groups = meta["param_groups"]
        live_groups = [[n for n, p in params.items() if any(p is q for q in g["params"])] for g in optimizer.param_groups]
        if [sorted(g["params"]) for g in saved_groups] != [sorted(g) for g in live_groups]:
            raise ValueError("the optimizer's parameter groups differ from the checkpoint's")
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        for name, keys in meta["tensors"].items():
            for key in keys:
                fresh.setdefault(name, {})[key] = targets[f"optimizer.{name}.{key}"] = torch.zeros_like(
                    params[name].detach())
    with _one_process_is_fine():
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=not dist.is_initialized())
    if optimizer is None:
        return
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        for key, value in saved.items():
            if key != "params":
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    optimizer.state.clear()
    for name in set(fresh) | set(meta["zero_dim"]) | set(meta["scalars"]):
        state = dict(fresh.get(name, {}))
        for key, item in meta["zero_dim"].get(name, {}).items():
            state[key] = torch.tensor(item["value"], dtype=getattr(torch, item["dtype"]))
        state.update(meta["scalars"].get(name, {}))
        optimizer.state[params[name]] = state
