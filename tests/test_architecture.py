"""The package's structure, read from its source (AST) and from what it writes: no import circles inside gpt/,
the web server imported only by the CLI, one module per artifact spelling its file names, and ordinary
permissions (0755 directories, 0644 files under umask 022) on every artifact directory."""

from __future__ import annotations

import ast
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPT = ROOT / "gpt"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gpt_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(GPT.rglob("*.py"))}


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of `known` that `path` imports anywhere (module level or inside functions).

    `from gpt.x import y` counts as importing gpt.x.y when that is a module, else gpt.x."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {name for name in found if name in known and name != this}


def import_graph() -> dict[str, set[str]]:
    known = gpt_modules()
    return {name: imported_modules(path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_inside_gpt():
    graph = import_graph()
    assert "gpt.model_dir" in graph and graph["gpt.model_dir"]  # the scan sees imports at all
    assert cycles(graph) == []


def test_only_the_cli_imports_the_web_server():
    """Offline tools (train, evaluate, quantize, HF export) never import gpt.serve; the server imports gpt.*."""
    graph = import_graph()
    importers = sorted(name for name, deps in graph.items()
                       if not name.startswith("gpt.serve") and any(d.startswith("gpt.serve") for d in deps))
    assert importers == ["gpt.cli"]
    known = {**gpt_modules(), **{module_name(p): p for p in (ROOT / "stages").glob("*.py")}}
    for stage in sorted((ROOT / "stages").glob("*.py")):
        assert not [d for d in imported_modules(stage, known) if d.startswith("gpt.serve")], stage


# File names and the one module allowed to spell each (everyone else imports its constant).
OWNED_FILE_NAMES = {
    "model.safetensors": "gpt/model_dir.py",
    "config.json": "gpt/model_dir.py",
    "lineage.json": "gpt/model_dir.py",
    "quantization.json": "gpt/model_dir.py",
    "tokenizer.model": "gpt/tokenizer.py",
    "tokenizer.json": "gpt/tokenizer.py",
    "tokenizer_config.json": "gpt/tokenizer.py",
}


def spelled_file_names(path: Path) -> set[str]:
    """Owned file names that appear in `path` as a string constant, alone or ending a path ("x/lineage.json")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(name for name in OWNED_FILE_NAMES
                         if node.value == name or node.value.endswith("/" + name))
    return found


def test_each_artifact_file_name_is_spelled_by_its_owner_only():
    offenders = {}
    for path in sorted(GPT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        names = sorted(n for n in spelled_file_names(path) if OWNED_FILE_NAMES[n] != rel)
        if names:
            offenders[rel] = names
    assert offenders == {}
    assert spelled_file_names(GPT / "model_dir.py") >= {"model.safetensors", "config.json", "lineage.json",
                                                         "quantization.json"}  # the scan would see them


# ---------------------------------------------------------------- permissions of what we write
@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every path under `root` (and root) → its permission bits, in octal; must be 755 (dirs) / 644 (files)."""
    paths = [root, *sorted(root.rglob("*"))]
    return {p.relative_to(root.parent).as_posix(): oct(p.stat().st_mode & 0o777) for p in paths}


def wrong_modes(root: Path) -> dict[str, str]:
    return {p: m for p, m in modes(root).items() if m != ("0o755" if (root.parent / p).is_dir() else "0o644")}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One of each artifact directory, written under umask 022."""
    import numpy as np
    import torch

    from gpt.atomic import atomic_directory
    from gpt.data.shards import ShardWriter
    from gpt.model import DecoderOnlyTransformer, ModelConfig
    from gpt.model_dir import Lineage, save_quantized, write_model_dir
    from gpt.tokenizer import TokenizerConfig, train_tokenizer
    from tests.conftest import TINY_LINES

    root = tmp_path_factory.mktemp("perm")
    with umask(0o022):
        tok = train_tokenizer(TINY_LINES, TokenizerConfig(vocab_size=384), root / "tokenizer")
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
        model = DecoderOnlyTransformer(config).eval()
        write_model_dir(model, root / "model", tok.path, Lineage(tokenizer_sha256=tok.sha256, step=1))
        write_model_dir(model, root / "model", tok.path, Lineage(tokenizer_sha256=tok.sha256, step=2))  # replace
        save_quantized(root / "model", root / "int8", "int8")
        save_quantized(root / "model", root / "bf16", "bf16")
        with atomic_directory(root / "shards") as tmp:
            writer = ShardWriter(tmp / "train", "train", tok.vocab_size, tok.sha256, shard_tokens=100)
            writer.add_document(np.arange(250) % tok.vocab_size, num_bytes=500)
            writer.close()
    return root


@pytest.mark.parametrize("artifact", ["tokenizer", "model", "int8", "bf16", "shards"])
def test_artifact_directories_get_ordinary_permissions(written, artifact):
    assert len(modes(written / artifact)) > 2
    assert wrong_modes(written / artifact) == {}


def test_hf_export_gets_ordinary_permissions(written):
    from gpt.hf_dir import export_hf

    with umask(0o022):
        out = export_hf(written / "model", written / "hf")
    assert wrong_modes(out) == {}


def test_training_checkpoint_gets_ordinary_permissions(written, tmp_path):
    import torch

    from gpt.model_dir import load_model
    from gpt.train.checkpoints import CheckpointManager

    model = load_model(written / "model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with umask(0o022):
        path = CheckpointManager(tmp_path / "checkpoints").save(model, optimizer, {"step": 1, "val_loss": 1.0})
    assert wrong_modes(path) == {}
