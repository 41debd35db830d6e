"""Tokens (and seconds) to a fixed validation loss: Muon vs AdamW, each at its best lr from a small sweep.

The default model (params.yaml `model:`, the tiny preset) on the default corpus's shards, params.yaml's `train:`
section except the optimizer and its lr, for --steps optimizer steps (warmup = the same fraction of the run as in
params.yaml). AdamW sweeps `train.lr`; Muon sweeps `train.muon_lr` (its AdamW part — embeddings, head, norms — keeps
params.yaml's lr). All runs take turns step by step in one process, so load from elsewhere hits all alike; each
run's clock counts only its own steps. Every --eval-every steps the loss on the first --eval-windows validation
windows is recorded (not timed).

Target: the final validation loss of the best AdamW run (so AdamW reaches it at its last step, by construction).
Tokens/seconds to target are linearly interpolated between evaluations. Reported: tokens_AdamW / tokens_Muon —
the anchors (modded-nanogpt, Moonlight) report ≈1.35x at GPT-2 small scale.

    python -m bench.bench_tokens_to_target                      # 3 lrs each, 250 steps (~15 min on 2 cores)
    python -m bench.bench_tokens_to_target --steps 20 --eval-every 10 --adamw-lrs 3.0e-3 --muon-lrs 2.0e-2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_recipe import build_ours, pipeline_data, with_run_env
from bench.common import cpu_name, finish


def run_sweep(args: argparse.Namespace, workdir: Path) -> dict:
    data = pipeline_data(args.params, workdir)
    from gpt.params import load_params

    base = load_params(args.params).train
    warmup = max(1, round(args.steps * base.warmup_steps / base.max_steps))
    common = f"max_steps={args.steps},warmup_steps={warmup}"
    variants = [("adamw", lr, f"{common},optimizer=adamw,lr={lr}") for lr in args.adamw_lrs]
    variants += [("muon", lr, f"{common},optimizer=muon,muon_lr={lr}") for lr in args.muon_lrs]
    runs = []
    for optimizer, lr, variant in variants:
        ours = build_ours(args.params, data, variant)
        val = torch.stack(list(ours.val_data.iter_windows(ours.cfg.seq_len, max_windows=args.eval_windows)))
        runs.append({"optimizer": optimizer, "lr": lr, "ours": ours, "val": val, "seconds": 0.0,
                     "curve": [], "tokens_per_step": ours.cfg.batch_size * ours.cfg.seq_len})
    load_before = os.getloadavg()
    for step in range(args.steps):
        for run in runs:  # one step each in turn
            start = time.perf_counter()
            run["ours"].step(step, step)
            run["seconds"] += time.perf_counter() - start
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                run["curve"].append((step + 1, run["seconds"], val_loss(run)))
        if (step + 1) % args.eval_every == 0:
            print(f"  step {step + 1}: " + ", ".join(f"{r['optimizer']} {r['lr']:g} {r['curve'][-1][2]:.3f}"
                                                   for r in runs), file=sys.stderr, flush=True)
    for run in runs:
        del run["ours"], run["val"]
    return {"runs": runs, "steps": args.steps, "warmup": warmup, "load_before": load_before,
            "load_after": os.getloadavg(), "data": data.note, "threads": torch.get_num_threads(),
            "eval_windows": args.eval_windows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


@torch.no_grad()
def val_loss(run: dict) -> float:
    from gpt.train.step import validation_loss

    ours = run["ours"]
    loss = validation_loss(ours.model, run["val"], ours.precision, 16)
    ours.model.train()
    return loss


def to_target(curve: list[tuple[int, float, float]], target: float, tokens_per_step: int) -> tuple[float, float]:
    """(tokens, seconds) when the validation loss first reaches `target`, interpolated between evaluations;
    (inf, inf) if it never does."""
    prev = (0, 0.0, float("inf"))
    for point in curve:
        if point[2] <= target:
            step0, sec0, loss0 = prev
            frac = 1.0 if loss0 == float("inf") else (loss0 - target) / (loss0 - point[2])
            step = step0 + frac * (point[0] - step0)
            return step * tokens_per_step, sec0 + frac * (point[1] - sec0)
        prev = point
    return float("inf"), float("inf")


def table(result: dict) -> str:
    runs = result["runs"]
    best = {opt: min((r for r in runs if r["optimizer"] == opt), key=lambda r: r["curve"][-1][2])
            for opt in ("adamw", "muon") if any(r["optimizer"] == opt for r in runs)}
    target = best["adamw"]["curve"][-1][2] if "adamw" in best else min(r["curve"][-1][2] for r in runs)
    tps = runs[0]["tokens_per_step"]
    lines = [f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {result['threads']} threads, "
             f"{result['date']}; load average before {[round(x, 2) for x in result['load_before']]} / after "
             f"{[round(x, 2) for x in result['load_after']]}. {result['steps']} steps × {tps:,} tokens "
             f"(warmup {result['warmup']}), validation loss on {result['eval_windows']} windows. Data: "
             f"{result['data']}. Target = the best AdamW run's final loss, {target:.4f}.",
             "",
             "| optimizer | lr (AdamW: lr; Muon: muon_lr) | final val loss | ms/step | tokens to target | "
             "seconds to target |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        tokens, seconds = to_target(r["curve"], target, tps)
        mark = " (best)" if r is best.get(r["optimizer"]) else ""
        lines.append(f"| {r['optimizer']}{mark} | {r['lr']:g} | {r['curve'][-1][2]:.4f} | "
                     f"{1000 * r['seconds'] / result['steps']:.0f} | "
                     f"{'—' if tokens == float('inf') else f'{tokens:,.0f}'} | "
                     f"{'—' if seconds == float('inf') else f'{seconds:.0f}'} |")
    if len(best) == 2:
        ta, sa = to_target(best["adamw"]["curve"], target, tps)
        tm, sm = to_target(best["muon"]["curve"], target, tps)
        if tm == float("inf"):
            lines += ["", "The best Muon run did not reach the target within the run."]
        else:
            lines += ["", f"Best AdamW / best Muon: tokens to target {ta / tm:.2f}×, seconds to target "
                          f"{sa / sm:.2f}× (> 1: Muon gets there sooner)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[1.5e-3, 3.0e-3, 6.0e-3])
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[1.0e-2, 2.0e-2, 4.0e-2])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    parser.add_argument("--out", type=Path, default=Path("bench/out/tokens_to_target.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_sweep(args, Path(tmp))
    return finish(result, table(result), args.out, args.write, "tokens_to_target",
                  "Tokens to a target loss: Muon vs AdamW (bench/bench_tokens_to_target.py)")


if __name__ == "__main__":
    with_run_env("bench.bench_tokens_to_target")
    main()
