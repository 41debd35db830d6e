"""End to end: the real `dvc repro` on a copy of the tracked project with shrunk params.

The test copies `git ls-files` into a temp dir, shrinks params (SHRINK), makes a git repo, runs `dvc repro` for
real, runs each stage's CHECKS on its outputs, checks that a second `dvc repro` runs nothing and `dvc status` is
clean, and that forcing the deterministic stages again reproduces identical dvc.lock hashes.

Owners of later stages add their stage here: an entry in SHRINK (params overrides, deep-merged into params.yaml)
and a `@check("<stage>")` function taking (project dir, metrics of that stage, loaded params).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Params overrides per section, so the whole pipeline runs in well under a minute on 2 cores.
SHRINK: dict[str, dict] = {
    "prepare": {"sources": [{"kind": "builtin", "max_documents": 80}, {"kind": "files"}], "split": {"val_fraction": 0.15}},
    "sft_data": {"tasks": {"per_task": 20, "heldout_per_task": 5}, "docqa": {"max_items": 100}},
    "tokenizer": {"vocab_size": 512},
    "tokenize": {"shard_tokens": 8192},
    # D: train/evaluate — a 2-layer model, 30 steps
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "train": {"max_steps": 30, "batch_size": 8, "seq_len": 64, "warmup_steps": 5, "eval_every": 10,
              "eval_windows": 8, "checkpoint_every": 15, "log_every": 5, "progress": False},
    "evaluate": {"max_windows": 20, "max_new_tokens": 8, "prompts": ["The"]},
    "rl": {"steps": 3, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6, "heldout_items": 2},
}
# Stages whose outputs must be bit-identical when re-run (their metrics too, except files listed as timed).
DETERMINISTIC_STAGES = ["prepare", "sft_data", "tokenizer", "tokenize"]
TIMED_OUTPUTS = {"metrics/tokenize.json"}  # holds throughput

CHECKS: dict[str, Callable[[Path, dict, dict], None]] = {}


def check(stage: str):
    def register(fn):
        CHECKS[stage] = fn
        return fn

    return register


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@check("prepare")
def _check_prepare(project: Path, metrics: dict, params: dict) -> None:
    from gpt.data.corpus import count_rows

    assert metrics["documents_out"] == count_rows(project / params["paths"]["cleaned"]) > 0
    assert metrics["splits"]["train"]["documents"] > 0 and metrics["splits"]["val"]["documents"] > 0
    assert metrics["documents_in"] == params["prepare"]["sources"][0]["max_documents"]


@check("sft_data")
def _check_sft_data(project: Path, metrics: dict, params: dict) -> None:
    from gpt.sft.data import HELDOUT_FILE, read_heldout, split_path

    sft_dir = project / params["paths"]["sft_data"]
    for split in ("train", "val"):
        assert sum(1 for _ in open(split_path(sft_dir, split), encoding="utf-8")) == metrics["conversations"][split]
    assert metrics["conversations"]["train"] > 0 and metrics["by_source"]["docqa"] > 0
    tasks = params["sft_data"]["tasks"]
    assert len(read_heldout(sft_dir / HELDOUT_FILE)) == metrics["heldout"] == 5 * len(tasks["names"])


@check("tokenizer")
def _check_tokenizer(project: Path, metrics: dict, params: dict) -> None:
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.load(project / params["paths"]["tokenizer"])
    assert tok.vocab_size == metrics["vocab_size"] == params["tokenizer"]["vocab_size"]
    assert metrics["val"]["bytes_per_token"] > 1.5 and metrics["val"]["byte_fallback_rate"] < 0.05


@check("tokenize")
def _check_tokenize(project: Path, metrics: dict, params: dict) -> None:
    from gpt.data.shards import TokenShards
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.load(project / params["paths"]["tokenizer"])
    for split in ("train", "val"):
        shards = TokenShards(project / params["paths"]["shards"] / split, tok.sha256, tok.vocab_size)
        assert shards.num_tokens == metrics[split]["num_tokens"] > 0
        assert shards.num_documents == metrics[split]["num_documents"]


@check("rl")
def _check_rl(project: Path, metrics: dict, params: dict) -> None:
    from gpt.model_dir import load_model, read_lineage

    rl = params["rl"]
    assert metrics["train"]["steps"] == rl["steps"] and metrics["heldout"]["after"]["items"] > 0
    out = project / params["paths"]["rl_model"]
    assert read_lineage(out).extra["kind"] == "rl" and load_model(out).config.d_model == params["model"]["d_model"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in dvc.yaml = this venv
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
        GIT_AUTHOR_NAME="e2e", GIT_AUTHOR_EMAIL="e2e@localhost", GIT_COMMITTER_NAME="e2e",
        GIT_COMMITTER_EMAIL="e2e@localhost",
    )
    env.pop("DVCLIVE_TEST", None)
    return env


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 400) -> str:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _dvc(*args: str, cwd: Path, env: dict) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env)


def _copy_tracked_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # skip files deleted in the working tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _out_hashes(project: Path, stages: list[str]) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {
        f"{stage}:{out['path']}": out.get("md5") or out.get("hash")
        for stage in stages
        for out in lock[stage].get("outs", [])
        if out["path"] not in TIMED_OUTPUTS
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("e2e")
    project = tmp / "project"
    _copy_tracked_tree(project)
    params = deep_merge(yaml.safe_load((project / "params.yaml").read_text()), SHRINK)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(tmp)
    _run(["git", "init", "-q"], project, env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "e2e snapshot"], project, env)
    _dvc("repro", cwd=project, env=env)
    return project, params, env


@pytest.mark.slow
def test_repro_builds_every_stage(project):
    project, params, _ = project
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for name in DETERMINISTIC_STAGES:
        assert name in stages
    for name, fn in CHECKS.items():
        metrics_file = project / params["paths"]["metrics"] / f"{name}.json"
        fn(project, json.loads(metrics_file.read_text()) if metrics_file.exists() else {}, params)


@pytest.mark.slow
def test_second_repro_does_nothing(project):
    project, _, env = project
    out = _dvc("repro", cwd=project, env=env)
    assert "Running stage" not in out, out
    assert "up to date" in _dvc("status", cwd=project, env=env)


@pytest.mark.slow
def test_forced_rerun_gives_identical_lock_hashes(project):
    project, _, env = project
    before = _out_hashes(project, DETERMINISTIC_STAGES)
    for stage in DETERMINISTIC_STAGES:
        _dvc("repro", "--force", "--single-item", stage, cwd=project, env=env)
    assert _out_hashes(project, DETERMINISTIC_STAGES) == before
    assert "up to date" in _dvc("status", cwd=project, env=env)  # nothing downstream saw a change


# ---- D: train and evaluate ----
@check("train")
def _check_train(project: Path, metrics: dict, params: dict) -> None:
    from gpt.tokenizer import Tokenizer

    paths = params["paths"]
    model_dir = project / paths["model"]
    assert {p.name for p in model_dir.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.model",
                                                     "lineage.json"}
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["step"] == params["train"]["max_steps"]
    assert lineage["tokenizer_sha256"] == Tokenizer.load(project / paths["tokenizer"]).sha256
    steps = sorted(p.name for p in (project / paths["checkpoints"]).iterdir() if p.name.startswith("step-"))  # sft/ too
    assert steps == ["step-000015", "step-000030"]
    live = json.loads((project / paths["metrics"] / "train" / "metrics.json").read_text())
    assert live["step"] == 30 and live["val"]["loss"] < live["train"]["loss"] + 1.0


@check("eval")  # the evaluate stage writes metrics/eval.json
def _check_evaluate(project: Path, metrics: dict, params: dict) -> None:
    assert metrics["bits_per_byte"] > 0 and metrics["unigram_bits_per_byte"] > 0
    assert metrics["windows"] == 20 and metrics["model_step"] == params["train"]["max_steps"]
    assert "## 1. `The`" in (project / params["paths"]["metrics"] / "samples.md").read_text()


@pytest.mark.slow
def test_exp_run_with_changed_lr_then_metrics_diff(project):
    """`dvc exp run -S train.lr=...` retrains (fresh start: the old checkpoints are another run's) and
    `dvc metrics diff` / `dvc exp show` report the change."""
    project, params, env = project
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "baseline run"], project, env)
    out = _dvc("exp", "run", "-S", "train.lr=1.0e-2", cwd=project, env=env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'tokenize'" not in out
    state = json.loads((project / "data/checkpoints/step-000030/state.json").read_text())
    assert state["params"]["train"]["lr"] == 1.0e-2
    diff = json.loads(_dvc("metrics", "diff", "--json", cwd=project, env=env))
    assert "val_loss" in diff["metrics/eval.json"] and "bits_per_byte" in diff["metrics/eval.json"]
    shown = _dvc("exp", "show", "--csv", cwd=project, env=env)
    assert "train.lr" in shown and "0.01" in shown


# ---- C: augment (translation augmentation, apertium en→es; CI installs apertium via `make system-deps`) ----
SHRINK["augment"] = {"fraction": 0.5}  # ~30 of the ~68 train documents, a few seconds
DETERMINISTIC_STAGES.insert(DETERMINISTIC_STAGES.index("prepare") + 1, "augment")  # re-run = cache hits = same bytes
TIMED_OUTPUTS.add("metrics/augment.json")  # holds throughput


@check("augment")
def _check_augment(project: Path, metrics: dict, params: dict) -> None:
    import pyarrow as pa

    from gpt.data.corpus import read_corpus

    paths = params["paths"]
    cleaned = pa.Table.from_batches(list(read_corpus(project / paths["cleaned"]))).to_pylist()
    augmented = pa.Table.from_batches(list(read_corpus(project / paths["augmented"]))).to_pylist()
    assert [{k: r[k] for k in cleaned[0]} for r in augmented if r["origin_id"] is None] == cleaned
    train = {r["id"]: r for r in cleaned if r["split"] == "train"}
    added = [r for r in augmented if r["origin_id"] is not None]
    assert len(added) == metrics["documents_translated"] > 0 and metrics["documents_failed"] == 0
    for row in added:  # leakage guard: only train documents, translated rows only in train
        assert row["split"] == "train" and row["origin_id"] in train and row["mt_backend"] == "apertium"
        assert row["lang"] == params["augment"]["tgt_lang"] and row["text"] != train[row["origin_id"]]["text"]
    assert (project / paths["translation_cache"] / "translations.sqlite").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage in ("tokenizer", "tokenize"):  # both are built from the augmented corpus
        assert paths["augmented"] in [dep["path"] for dep in lock[stage]["deps"]]


# ---- E: using the trained model (gpt CLI); E's request in notes/requests.md, added by F ----
def _gpt(project: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "gpt.cli", *args], cwd=project, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"gpt {' '.join(args)}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


@check("use")  # no stage of its own: metrics is {}
def _check_gpt_cli(project: Path, metrics: dict, params: dict) -> None:
    import torch

    from gpt.model_dir import load_model
    from gpt.tokenizer import Tokenizer

    model_dir = project / params["paths"]["model"]
    outside = project.parent  # not in the project: the exp-run test below commits the project with `git add -A`
    # Greedy `gpt generate` prints exactly the Python API's greedy continuation of the same model.
    printed = _gpt(project, "generate", "-c", str(model_dir), "The", "-m", "5", "-t", "0")
    tok, model = Tokenizer.load(model_dir), load_model(model_dir).eval()
    prompt_ids = tok.encode("The")
    new_ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=5, temperature=0.0,
                             eos_token_id=tok.eos_id)[0, len(prompt_ids):].tolist()
    new_ids = new_ids[: new_ids.index(tok.eos_id)] if tok.eos_id in new_ids else new_ids
    assert printed == tok.decode(prompt_ids + new_ids) + "\n"
    info = json.loads(_gpt(project, "info", "-c", str(model_dir), "--json"))
    assert info["tokenizer"]["matches_lineage"] and info["lineage"]["step"] == params["train"]["max_steps"]
    assert info["parameters"] == model.num_parameters()
    _gpt(project, "quantize", "-c", str(model_dir), "--dtype", "int8", "-o", str(outside / "use-int8"))
    assert _gpt(project, "generate", "-c", str(outside / "use-int8"), "The", "-m", "5", "--seed", "0").startswith("The")
    _gpt(project, "export", "--format", "hf", "-c", str(model_dir), "-o", str(outside / "use-hf"))
    assert {p.name for p in (outside / "use-hf").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


# ---- F: the evaluate stage's training-curves PNG, and the dvc.yaml top-level plots ----
@check("training_png")  # written by the evaluate stage; no metrics file of its own
def _check_training_png(project: Path, metrics: dict, params: dict) -> None:
    from PIL import Image

    from gpt.plots import DPI, FIGSIZE, render_training_plot

    metrics_dir = project / params["paths"]["metrics"]
    png = metrics_dir / "training.png"
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert "metrics/training.png" in [out["path"] for out in lock["evaluate"]["outs"]]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    # The stage's picture is exactly what gpt.plots draws from the stage's inputs (eval.json's baseline included).
    again = render_training_plot(metrics_dir / "train", project.parent / "training-again.png", metrics_dir / "eval.json")
    assert again.read_bytes() == png.read_bytes()
    res = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "-o", str(project.parent / "plots")],
                         cwd=project, env=_env(project.parent), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    shown = json.loads(res.stdout)["data"]  # the dvc.yaml top-level `loss` chart: train and val on one chart
    assert {row["filename"] for row in shown["loss"][0]["content"]["data"]["values"]} == {"train/loss.tsv",
                                                                                        "val/loss.tsv"}
    assert shown["metrics/training.png"][0]["type"] == "image"


# ---- issue 11: resume state is not an artifact; a fresh clone + dvc pull is up to date ----
@pytest.mark.slow
def test_fresh_clone_after_dvc_push_and_pull_is_up_to_date(project, tmp_path):
    """`dvc push` to a local remote → `git clone` → `dvc pull`: `dvc status` reports nothing to do and `dvc repro`
    runs nothing (the checkpoints, which are never pushed, are not a stage output)."""
    project, _, env = project
    _dvc("remote", "add", "--force", "--default", "e2e", str(tmp_path / "remote"), cwd=project, env=env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "pipeline results + remote", "--allow-empty"], project, env)
    assert (project / "data/checkpoints").is_dir()  # there, but neither pushed nor tracked
    _dvc("push", cwd=project, env=env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    _dvc("pull", cwd=clone, env=env)
    status = _dvc("status", cwd=clone, env=env)
    assert "up to date" in status and "deleted" not in status and "changed" not in status, status
    out = _dvc("repro", cwd=clone, env=env)
    assert "Running stage" not in out, out
    assert not (clone / "data/checkpoints").exists()


# ---- issue 13: sft (the chat model) and chat_eval ----
SHRINK["sft"] = {"max_steps": 20, "batch_size": 8, "eval_every": 10, "eval_windows": 8, "checkpoint_every": 10,
                 "samples": 1, "max_new_tokens": 8, "eval": {"max_items": 10, "max_new_tokens": 8}}


@check("sft")
def _check_sft(project: Path, metrics: dict, params: dict) -> None:
    from gpt.model_dir import load, read_lineage

    paths = params["paths"]
    assert metrics["train"]["steps"] == 20 and metrics["val"]["after"]["loss"] < metrics["val"]["before"]["loss"]
    lineage = read_lineage(project / paths["chat_model"])
    parent = hashlib.sha256((project / paths["model"] / "model.safetensors").read_bytes()).hexdigest()
    assert lineage.extra["parent"]["weights_sha256"] == parent
    assert load(project / paths["chat_model"]).model.config.vocab_size == params["tokenizer"]["vocab_size"]
    assert "assistant (chat model)" in (project / paths["metrics"] / "sft_samples.md").read_text()


@check("chat_eval")
def _check_chat_eval(project: Path, metrics: dict, params: dict) -> None:
    chat = metrics["chat"]  # a 64-token model skips the held-out items that do not fit (counted)
    assert set(metrics) == {"pretrained", "chat"} and chat["items"] + chat["skipped_too_long"] == 10 < 3 * chat["items"]
    assert metrics["chat"]["assistant_loss"] < metrics["pretrained"]["assistant_loss"]
