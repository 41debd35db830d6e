"""Training curves as a PNG, rendered offline with matplotlib from the DVCLive TSVs of the train stage.

`dvc plots show` writes HTML that loads vega from a CDN (blank offline); this gives one picture that opens
anywhere: loss (train and validation, vs step with a tokens axis on top), learning rate, gradient norm and
throughput. The unigram baseline from metrics/eval.json is drawn on the loss panel in nats/token: eval.json holds
bits-per-byte for both the model and the baseline over the same scored tokens and bytes, so
unigram nats/token = unigram_bits_per_byte × (val_loss / bits_per_byte) — the factor is ln 2 × bytes per token of
the tokenizer the curves were trained with. The PNG is deterministic for given data and matplotlib/FreeType
versions: fixed size and DPI, matplotlib's default style (a user matplotlibrc is ignored), no Software/time
metadata. The figure is drawn on a bare `Figure` (Agg canvas), so no GUI backend or pyplot state is involved.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from gpt.atomic import write_atomic

log = logging.getLogger(__name__)

# DVCLive writes one TSV per metric under <live dir>/plots/metrics/<name>.tsv, columns "step" and the leaf name.
CURVES = ("train/loss", "val/loss", "lr", "grad_norm", "tokens_per_s", "tokens")
FIGSIZE = (11.0, 7.5)  # inches
DPI = 100  # → 1100 × 750 pixels


@dataclass(frozen=True)
class Series:
    """One logged metric: x = optimizer step, y = the value."""

    steps: tuple[float, ...]
    values: tuple[float, ...]


def read_series(path: Path) -> Series | None:
    """Read a DVCLive TSV (`step<TAB>value`). None (with a warning) when missing, empty or unreadable."""
    if not path.is_file():
        log.warning("plots: %s is missing; its panel stays empty", path)
        return None
    steps, values, bad = [], [], 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if not header or len(header) < 2 or header[0] != "step":
            log.warning("plots: %s has no `step<TAB>value` header; skipped", path)
            return None
        for row in reader:
            try:
                if len(row) != len(header):
                    raise ValueError(row)
                step, value = float(row[0]), float(row[-1])  # DVCLive: step first, the metric last
            except ValueError:
                bad += 1
                continue
            if math.isfinite(value):
                steps.append(step)
                values.append(value)
            else:
                bad += 1
    if bad:
        log.warning("plots: %s: skipped %d unparsable or non-finite rows", path, bad)
    if not steps:
        log.warning("plots: %s has no data rows", path)
        return None
    return Series(tuple(steps), tuple(values))


def read_training_curves(live_dir: Path) -> dict[str, Series | None]:
    """Every curve in CURVES from `<live_dir>/plots/metrics/`; a missing one maps to None."""
    plots_dir = Path(live_dir) / "plots" / "metrics"
    return {name: read_series(plots_dir / f"{name}.tsv") for name in CURVES}


def unigram_loss_per_token(eval_metrics: dict) -> float | None:
    """The unigram baseline in nats/token (comparable to the loss curves), or None if eval.json lacks the keys."""
    try:
        val_loss = float(eval_metrics["val_loss"])
        bpb = float(eval_metrics["bits_per_byte"])
        unigram_bpb = float(eval_metrics["unigram_bits_per_byte"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (bpb > 0 and math.isfinite(val_loss) and math.isfinite(unigram_bpb)):
        return None
    return unigram_bpb * val_loss / bpb


def baseline_from_eval(eval_json: Path | None, last_step: float | None) -> float | None:
    """Unigram nats/token from eval.json, only when that file evaluated the model at the curves' last step."""
    if eval_json is None or not Path(eval_json).is_file():
        return None
    try:
        metrics = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("plots: cannot read %s (%s); no baseline drawn", eval_json, exc)
        return None
    step = metrics.get("model_step")
    if last_step is not None and step is not None and float(step) != last_step:
        # Another run's evaluation (maybe another tokenizer): its per-token baseline would not be comparable.
        log.warning("plots: %s is for step %s but the curves end at step %g; no baseline drawn",
                    eval_json, step, last_step)
        return None
    return unigram_loss_per_token(metrics)


def _empty_panel(ax, title: str, missing: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no data\n({missing}.tsv missing or empty)", ha="center", va="center", transform=ax.transAxes,
            color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _tokens_axis(ax, tokens: Series) -> None:
    """A top x axis in tokens seen. Drawn only when tokens = step × tokens_per_step exactly (the trainer's
    constant global batch), so the axis is a linear rescaling that stays right beyond the logged range."""
    per_step = tokens.values[-1] / tokens.steps[-1] if tokens.steps[-1] > 0 else 0.0
    if per_step <= 0 or any(abs(t - s * per_step) > 1e-6 * max(t, 1.0) for s, t in zip(tokens.steps,
                                                                                       tokens.values)):
        return
    scale = per_step / 1e6
    top = ax.secondary_xaxis("top", functions=(lambda s: s * scale, lambda t: t / scale))
    top.set_xlabel(f"tokens seen (millions; {per_step:,.0f} per step)")


def _loss_panel(ax, curves: dict[str, Series | None], baseline: float | None) -> None:
    train, val = curves["train/loss"], curves["val/loss"]
    if train is None and val is None:
        _empty_panel(ax, "Loss", "train/loss, val/loss")
        return
    if train is not None:
        ax.plot(train.steps, train.values, color="tab:blue", linewidth=1.2, label="train loss")
    if val is not None:
        ax.plot(val.steps, val.values, color="tab:orange", marker="o", markersize=3.5, linewidth=1.5,
                label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, color="0.35", linestyle="--", linewidth=1.0,
                   label=f"unigram baseline ({baseline:.2f}, from eval.json)")
    ax.set_title("Loss (cross-entropy, nats/token; lower is better)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    if curves["tokens"] is not None:
        _tokens_axis(ax, curves["tokens"])


def _line_panel(ax, series: Series | None, name: str, title: str, ylabel: str, color: str) -> None:
    if series is None:
        _empty_panel(ax, title, name)
        return
    ax.plot(series.steps, series.values, color=color, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _suptitle(curves: dict[str, Series | None]) -> str:
    parts = ["Training curves"]
    train, val = curves["train/loss"], curves["val/loss"]
    if train is not None:
        parts.append(f"{int(train.steps[-1])} steps")
    if val is not None:
        parts.append(f"last validation loss {val.values[-1]:.3f} nats/token")
    return " — ".join(parts)


def render_training_plot(live_dir: Path, out_png: Path, eval_json: Path | None = None) -> Path:
    """Draw the curves under `live_dir` (the train stage's DVCLive dir) into `out_png`, atomically.

    Missing TSVs leave their panel saying so (and log a warning); the PNG is written in any case, so the
    evaluate stage never fails over a picture.
    """
    import matplotlib.style
    from matplotlib.figure import Figure

    curves = read_training_curves(live_dir)
    train = curves["train/loss"]
    baseline = baseline_from_eval(eval_json, train.steps[-1] if train is not None else None)
    with matplotlib.style.context("default"):
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        (loss_ax, lr_ax), (grad_ax, speed_ax) = fig.subplots(2, 2)
        _loss_panel(loss_ax, curves, baseline)
        _line_panel(lr_ax, curves["lr"], "lr", "Learning rate (schedule)", "learning rate", "tab:green")
        _line_panel(grad_ax, curves["grad_norm"], "grad_norm", "Gradient norm (before clipping)", "L2 norm",
                    "tab:red")
        _line_panel(speed_ax, curves["tokens_per_s"], "tokens_per_s", "Training throughput", "tokens / second",
                    "tab:purple")
        fig.suptitle(_suptitle(curves))
        return _save_png(fig, Path(out_png))


def _save_png(fig, out_png: Path) -> Path:
    # Software=None drops matplotlib's version stamp; PNGs from Agg carry no time by default.
    return write_atomic(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None}))
