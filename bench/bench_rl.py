"""SFT vs GRPO vs PPO on held-out checkable tasks (issue 14): mean ± spread of exact match over seeds.

Starts every run from the same chat model (default paths.chat_model: the `sft` stage's output), runs `gpt.rl.run.run_rl`
with params.yaml's `rl:` section (plus `--set key=value` overrides) for each algorithm and seed in sequence, and
reports held-out exact match (greedy, the same items for every seed), the mean training reward of the first step
(the SFT policy's samples) and of the last quarter of the steps, and the wall time. The SFT row is the model before
any update (greedy decoding: the same for every seed).

    python -m bench.bench_rl                                  # grpo and ppo, seeds 0 1 2, params.yaml's rl section
    python -m bench.bench_rl --set steps=60 --set lr=3.0e-5   # overrides (YAML values)
    python -m bench.bench_rl --write                          # also replace this benchmark's section in bench/README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from bench.common import cpu_name, write_section
from gpt.chat import ChatTemplate
from gpt.params import load_params
from gpt.rl.config import RLConfig
from gpt.rl.run import run_rl, split_problems
from gpt.tokenizer import Tokenizer
from gpt.train.init import parent_model


def overridden(cfg: RLConfig, settings: list[str], **fixed) -> RLConfig:
    values = dict(fixed)
    for item in settings:
        key, _, text = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(RLConfig)}:
            raise SystemExit(f"--set {item}: no rl.{key}")
        value = yaml.safe_load(text)
        if isinstance(getattr(cfg, key), float) and isinstance(value, (int, str)):
            value = float(value)  # YAML reads 3e-4 (no dot) as a string
        values[key] = value
    return dataclasses.replace(cfg, **values)


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def best_constant(cfg: RLConfig, heldout_fraction: float, salt: str) -> float:
    """Held-out exact match of the best fixed reply per task (what learning only the answer frequencies gives)."""
    _, heldout = split_problems(cfg, heldout_fraction, salt)
    right = sum(max(Counter(p.answer for p in heldout if p.task == task).values()) for task in cfg.tasks)
    return right / len(heldout)


def run_one(parent, template: ChatTemplate, cfg: RLConfig, heldout_fraction: float, salt: str) -> dict:
    start = time.perf_counter()
    result = run_rl(parent.load(), template, cfg, heldout_fraction, salt)
    tail = result.history[-max(1, len(result.history) // 4):]
    return {"algorithm": cfg.algorithm, "seed": cfg.seed, "before": result.before["exact_match"],
            "after": result.after["exact_match"], "per_task_before": result.before["per_task"],
            "per_task_after": result.after["per_task"], "items": result.after["items"],
            "reward_first": result.history[0]["reward"],
            "reward_last": statistics.fmean(h["reward"] for h in tail),
            "correct_last": statistics.fmean(h["correct"] for h in tail),
            "evals": [(e["step"], round(e["exact_match"], 3)) for e in result.evals],
            "rl_seconds": result.seconds, "wall_seconds": time.perf_counter() - start}


def table(runs: list[dict]) -> str:
    lines = ["| model | seeds | held-out exact match (mean ± sd) | per seed | train reward (mean) | time per run |",
             "|---|---|---|---|---|---|"]
    first = runs[0]
    sft_reward = statistics.fmean(r["reward_first"] for r in runs)
    lines.append(f"| SFT (chat model) | – | {first['before']:.3f} | greedy, same items | {sft_reward:.3f} "
                 f"(first-step samples) | – |")
    for algorithm in dict.fromkeys(r["algorithm"] for r in runs):
        rows = [r for r in runs if r["algorithm"] == algorithm]
        acc, sd = mean_spread([r["after"] for r in rows])
        reward, reward_sd = mean_spread([r["reward_last"] for r in rows])
        secs = statistics.fmean(r["wall_seconds"] for r in rows)
        per_seed = ", ".join(f"{r['after']:.3f}" for r in rows)
        lines.append(f"| {algorithm.upper()} | {','.join(str(r['seed']) for r in rows)} | {acc:.3f} ± {sd:.3f} | "
                     f"{per_seed} | {reward:.3f} ± {reward_sd:.3f} (last quarter) | {secs:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default=None, help="chat model directory (default: params paths.chat_model)")
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "ppo"], choices=["grpo", "ppo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an rl: override")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="bench/out/rl.json", help="where the per-run results go")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/README.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    parent = parent_model(args.model or params.paths.chat_model, key="--model")
    template = ChatTemplate(Tokenizer.load(parent.directory))
    split = params.sft_data.tasks
    runs = []
    for algorithm in args.algorithms:
        for seed in args.seeds:
            cfg = overridden(params.rl, args.set, algorithm=algorithm, seed=seed)
            runs.append(run_one(parent, template, cfg, split.heldout_fraction, params.sft_data.salt))
            r = runs[-1]
            print(f"{algorithm} seed {seed}: held-out {r['before']:.3f} → {r['after']:.3f} {r['per_task_after']} "
                  f"reward {r['reward_first']:.3f} → {r['reward_last']:.3f} ({r['wall_seconds']:.0f} s) evals {r['evals']}", flush=True)
    cfg = overridden(params.rl, args.set)
    load = os.getloadavg()
    constant = best_constant(cfg, split.heldout_fraction, params.sft_data.salt)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("algorithm", "seed")}
    text = (f"{table(runs)}\n\nrl settings: `{json.dumps(settings)}`; held-out items: {runs[0]['items']} "
            f"(per task: {json.dumps(runs[0]['per_task_before'])} before); the best fixed answer per task would score "
            f"{constant:.3f} on them. {cpu_name()}, {args.threads} torch "
            f"thread(s), load average {load[0]:.1f} at the end (shared machine).")
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": settings, "runs": runs}, indent=2), encoding="utf-8")
    if args.write:
        write_section("rl", "RL: SFT vs GRPO vs PPO on held-out tasks (`bench/bench_rl.py`, issue 14)", text)


if __name__ == "__main__":
    main()
