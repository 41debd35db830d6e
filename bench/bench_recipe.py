"""Recipe vs recipe at equal training wall time: our default pipeline vs nanoGPT's documented CPU recipe.

Peer: nanoGPT's README "I only have a macbook" run of config/train_shakespeare_char.py — character-level, 4 layers,
4 heads, width 128, context 64, batch 12, dropout 0, no compile, fp32 on CPU (nanoGPT autocasts only on CUDA),
AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1 on ≥2-D weights, grad clip 1.0), 100 warmup iterations then cosine
to 1e-4 at iteration 2000 (max_iters = lr_decay_iters = 2000) — built with HF transformers' GPT2LMHeadModel, the same
architecture (HF keeps the biases nanoGPT drops by default). Its vocabulary is the characters of the training text
plus an end-of-document id (the shards' EOS); a validation character never seen in training maps to one extra id.

Ours: params.yaml's `model:` and `train:` sections (the tiny preset, our sentencepiece tokenizer, our optimizer
and step code: gpt.train.optim/step), trained on the tokenize stage's shards.

Equal terms: the same text (the pipeline's train split, `paths.augmented` / `paths.shards`), the same machine and
process, the same training wall clock (`--seconds`, default 75 ≈ what `make repro`'s train stage trains: 450 steps at
~24k tokens/s on the 2-core Xeon of bench/README.md; `--seconds 180` for the longer comparison).
Contestants take turns one optimizer step at a time, the one with the least training time so far going next, so
load from elsewhere hits all alike; each one's clock counts only its own steps. Each recipe's lr schedule is
stretched over the budget (its warmup and decay happen at the same fraction of its time as in the documented run);
`peer (2000 iters)` is the README's run exactly, stopped at 2000 iterations (or the budget, if sooner).
Scoring: every token of the validation split after the first, in non-overlapping windows of each model's context,
fp32; bits per byte = summed nats / ln 2 / UTF-8 bytes of the validation documents (the same for all).

    python -m bench.bench_recipe                         # ours vs peer, 75 s each (~5.5 min on 2 cores)
    python -m bench.bench_recipe --clock cpu             # budget in CPU seconds per thread: for a shared machine
    python -m bench.bench_recipe --seconds 30 --write    # shorter; --write updates bench/README.md (section recipe)
    python -m bench.bench_recipe --no-peer --seconds 60 --variant default --variant optimizer=muon \
        --variant lr=6.0e-3,batch_size=32                # recipe sweep: train/model keys, equal wall time
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.bench_train import MALLOC_ENV
from bench.common import cpu_name, finish
from gpt.train.config import TrainConfig

LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class PeerRecipe:
    """nanoGPT README, CPU: train.py config/train_shakespeare_char.py --device=cpu --compile=False --block_size=64
    --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    learning_rate: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    max_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0

    def lr(self, it: float) -> float:
        """nanoGPT's get_lr: linear warmup, cosine to min_lr at lr_decay_iters, then min_lr."""
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it > self.lr_decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / (self.lr_decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.learning_rate - self.min_lr)


@dataclasses.dataclass
class Contestant:
    """One training run taking turns: `step(progress)` does one optimizer step (progress = fraction of its budget
    used so far, for time-stretched schedules); `nats()` scores the validation stream."""

    name: str
    step: Callable[[float], float]  # returns the training loss
    nats: Callable[[], float]
    max_steps: int | None = None  # stop after this many steps even if time is left
    seconds: float = 0.0
    steps: int = 0
    tokens_per_step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def done(self, budget: float) -> bool:
        return self.seconds >= budget or (self.max_steps is not None and self.steps >= self.max_steps)


def cpu_clock() -> float:
    """Process CPU seconds per torch thread: on an idle machine ≈ wall seconds of a step that keeps every thread
    busy (a little less: the single-threaded parts count once); on a shared machine it does not grow while the
    process waits for a core, so a budget on this clock buys about the same training whatever the load."""
    return time.process_time() / torch.get_num_threads()


CLOCKS = {"wall": time.perf_counter, "cpu": cpu_clock}


def race(contestants: list[Contestant], budget: float, clock: Callable[[], float] = time.perf_counter) -> None:
    """Round-robin by training time: the contestant with the least time so far takes the next step."""
    while True:
        running = [c for c in contestants if not c.done(budget)]
        if not running:
            return
        c = min(running, key=lambda c: c.seconds)
        start = clock()
        loss = c.step(min(1.0, c.seconds / budget))
        c.seconds += clock() - start
        c.steps += 1
        c.losses.append(loss)


@torch.no_grad()
def stream_nats(logits_of: Callable[[torch.Tensor], torch.Tensor], stream: torch.Tensor, context: int,
                batch_size: int = 32) -> tuple[float, int]:
    """Summed next-token nats over stream[1:] in non-overlapping windows of `context` predictions (the last one
    shorter): every token after the first is scored once. Returns (nats, scored tokens)."""
    n = stream.numel()
    starts = list(range(0, n - 1, context))
    nats, scored = 0.0, 0
    full = [s for s in starts if s + context + 1 <= n]
    for i in range(0, len(full), batch_size):
        rows = torch.stack([stream[s:s + context + 1] for s in full[i:i + batch_size]])
        logits = logits_of(rows[:, :-1]).float()
        nats += float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
        scored += rows[:, 1:].numel()
    tail = [s for s in starts if s + context + 1 > n]
    for s in tail:
        row = stream[s:].unsqueeze(0)
        logits = logits_of(row[:, :-1]).float()
        nats += float(F.cross_entropy(logits.flatten(0, 1), row[:, 1:].flatten(), reduction="sum"))
        scored += row.size(1) - 1
    assert scored == n - 1
    return nats, scored


# ---------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """The pipeline's outputs the bench reads: corpus (text), tokenizer and shards."""

    corpus: Path
    tokenizer: Path
    shards: Path
    note: str


def pipeline_data(params_file: Path, workdir: Path) -> Data:
    """The existing pipeline outputs (paths.augmented, paths.tokenizer, paths.shards) when present, else the
    default corpus prepared, tokenized and sharded in `workdir` (without the augment stage)."""
    from gpt.params import load_params

    params = load_params(params_file)
    paths = params.paths
    if (paths.shards / "train" / "manifest.json").is_file() and (paths.tokenizer).is_dir() and paths.augmented.is_dir():
        return Data(paths.augmented, paths.tokenizer, paths.shards, f"pipeline outputs ({paths.augmented}, "
                    f"{paths.shards})")
    from gpt.data.prepare import prepare_corpus
    from gpt.data.tokenize import tokenize_split
    from gpt.tokenizer import train_tokenizer, training_sentences

    corpus = workdir / "corpus"
    prepare_corpus(params.prepare, workdir / "no-raw", corpus)
    train_tokenizer(training_sentences(corpus, params.tokenizer), params.tokenizer, workdir / "tokenizer")
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.load(workdir / "tokenizer")
    for split in ("train", "val"):
        tokenize_split(tok, corpus, split, workdir / "shards" / split, params.tokenize)
    return Data(corpus, workdir / "tokenizer", workdir / "shards", "default corpus built in a temp dir (no augment)")


def split_texts(corpus: Path, split: str) -> list[str]:
    from gpt.data.corpus import read_corpus

    return [t for batch in read_corpus(corpus, split=split, columns=["text"]) for t in batch.column("text").to_pylist()]


def char_streams(train_texts: list[str], val_texts: list[str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Character ids of the two splits (documents joined by an end-of-document id, as the shards join by EOS):
    (train ids, val ids, vocab size, validation characters unseen in training)."""
    eos = "\x00"  # stands for the end-of-document id; the cleaner removes control characters from text

    def codepoints(texts: list[str]) -> np.ndarray:
        joined = eos.join(texts) + eos
        return np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)

    train_cp, val_cp = codepoints(train_texts), codepoints(val_texts)
    vocab = np.unique(train_cp)
    train_ids = np.searchsorted(vocab, train_cp)
    val_pos = np.minimum(np.searchsorted(vocab, val_cp), len(vocab) - 1)
    unseen = vocab[val_pos] != val_cp
    val_ids = np.where(unseen, len(vocab), val_pos)  # one extra id for unseen characters
    return train_ids.astype(np.int64), val_ids.astype(np.int64), len(vocab) + 1, int(unseen.sum())


# ------------------------------------------------------------------------------------------ contestants


def peer_contestant(recipe: PeerRecipe, train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int,
                    stretch: bool, seed: int) -> Contestant:
    """nanoGPT's recipe in HF GPT2LMHeadModel. stretch: the schedule spans the time budget (its iteration count
    scaled to the time used); else it is the documented 2000 iterations, stopping there."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=recipe.block_size, n_embd=recipe.n_embd,
                     n_layer=recipe.n_layer, n_head=recipe.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu", tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.learning_rate, betas=(recipe.beta1, recipe.beta2))
    data = torch.from_numpy(train_ids)
    rng = np.random.default_rng(seed)
    T, B = recipe.block_size, recipe.batch_size
    state = {"it": 0}

    def step(progress: float) -> float:
        it = progress * recipe.max_iters if stretch else state["it"]
        for group in opt.param_groups:
            group["lr"] = recipe.lr(it)
        starts = rng.integers(0, len(data) - T - 1, size=B)
        rows = torch.stack([data[s:s + T + 1] for s in starts])
        logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["it"] += 1
        return loss.item()

    def nats() -> float:
        model.eval()
        return stream_nats(lambda x: model(input_ids=x).logits, torch.from_numpy(val_ids), T)[0]

    name = "peer: nanoGPT CPU recipe (HF GPT-2), schedule over the budget" if stretch else \
        f"peer: nanoGPT CPU recipe as documented ({recipe.max_iters} iters)"
    return Contestant(name, step, nats, max_steps=None if stretch else recipe.max_iters, tokens_per_step=B * T,
                      info={"params": sum(p.numel() for p in model.parameters()), "vocab": vocab_size,
                            "precision": "fp32", "context": T, "batch": B})


TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def parse_variant(text: str) -> tuple[dict, dict]:
    """'lr=6.0e-3,n_layers=6' → (train overrides, model overrides); 'default' → ({}, {})."""
    import yaml

    train, model = {}, {}
    if text.strip() in ("", "default"):
        return train, model
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        (train if key in TRAIN_KEYS else model)[key] = yaml.safe_load(value)
    return train, model


@dataclasses.dataclass
class Ours:
    """Our model, optimizer and data for one variant of params.yaml's model/train sections."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    precision: object  # gpt.train.device.Precision
    train_data: object  # gpt.data.shards.TokenShards
    val_data: object
    vocab_size: int

    def step(self, step: int, lr_step: int) -> float:
        """One optimizer step on batch `step` at the schedule's lr for `lr_step`; returns the training loss."""
        from gpt.train.optim import lr_at, set_lr
        from gpt.train.step import train_step

        set_lr(self.optimizer, lr_at(min(self.cfg.max_steps - 1, lr_step), self.cfg))
        batch = self.train_data.get_batch(step, self.cfg.batch_size, self.cfg.seq_len, self.cfg.seed)
        return train_step(self.model, self.optimizer, [batch], self.precision, self.cfg.grad_clip).loss

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)[0]


def build_ours(params_file: Path, data: Data, variant: str) -> Ours:
    """params.yaml's model + train sections with a variant's overrides ('key=value,...'), on the data's shards."""
    from gpt.data.shards import TokenShards
    from gpt.model import DecoderOnlyTransformer
    from gpt.params import ModelParams, load_params
    from gpt.tokenizer import Tokenizer
    from gpt.train.device import Precision, resolve_precision
    from gpt.train.optim import build_optimizer

    params = load_params(params_file)
    train_over, model_over = parse_variant(variant)
    cfg = dataclasses.replace(params.train, **train_over)
    model_params = ModelParams.from_section({**params.model.to_section(), **model_over})
    tok = Tokenizer.load(data.tokenizer)
    model_cfg = model_params.resolve(tok.vocab_size)
    torch.manual_seed(cfg.seed)
    model = DecoderOnlyTransformer(model_cfg).train()
    precision = Precision(resolve_precision(cfg.precision, torch.device("cpu")), "cpu")
    return Ours(model, build_optimizer(model, cfg, "cpu"), cfg, precision,
                TokenShards(data.shards / "train", tok.sha256, tok.vocab_size),
                TokenShards(data.shards / "val", tok.sha256, tok.vocab_size), tok.vocab_size)


def ours_contestant(params_file: Path, data: Data, variant: str) -> Contestant:
    """Our recipe (params.yaml model + train, with a variant's overrides), its schedule stretched over the time
    budget: the lr of step progress × train.max_steps."""
    ours = build_ours(params_file, data, variant)
    cfg = ours.cfg
    state = {"step": 0}

    def step(progress: float) -> float:
        state["step"] += 1
        return ours.step(state["step"] - 1, int(progress * cfg.max_steps))

    def nats() -> float:
        ours.model.eval()
        stream = torch.from_numpy(ours.val_data.read(0, ours.val_data.num_tokens))
        return stream_nats(ours.logits, stream, cfg.seq_len)[0]

    label = "ours: params.yaml default" if variant in ("", "default") else f"ours: {variant}"
    return Contestant(label, step, nats, tokens_per_step=cfg.batch_size * cfg.seq_len,
                      info={"params": ours.model.num_parameters(), "vocab": ours.vocab_size,
                            "precision": ours.precision.name, "context": cfg.seq_len, "batch": cfg.batch_size,
                            "optimizer": cfg.optimizer})


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace, workdir: Path) -> dict:
    data = pipeline_data(args.params, workdir)
    from gpt.data.shards import read_manifest

    val_bytes = read_manifest(data.shards / "val")["num_bytes"]
    contestants = [ours_contestant(args.params, data, v) for v in (args.variant or ["default"])]
    unseen = 0
    if args.peer:
        train_texts, val_texts = split_texts(data.corpus, "train"), split_texts(data.corpus, "val")
        text_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
        if text_bytes != val_bytes:
            raise SystemExit(f"validation text {text_bytes} bytes != shards' {val_bytes}: corpus and shards differ")
        train_ids, val_ids, vocab, unseen = char_streams(train_texts, val_texts)
        recipe = PeerRecipe()
        contestants.append(peer_contestant(recipe, train_ids, val_ids, vocab, stretch=True, seed=args.seed))
        if args.peer_documented:
            contestants.append(peer_contestant(recipe, train_ids, val_ids, vocab, stretch=False, seed=args.seed))
    load_before = os.getloadavg()
    start = time.perf_counter()
    race(contestants, args.seconds, CLOCKS[args.clock])
    wall = time.perf_counter() - start
    rows = []
    for c in contestants:
        nats = c.nats()
        rows.append({"name": c.name, "seconds": c.seconds, "steps": c.steps,
                     "tokens": c.steps * c.tokens_per_step, "tok_s": c.steps * c.tokens_per_step / c.seconds,
                     "final_train_loss": statistics.fmean(c.losses[-20:]), "bpb": nats / LN2 / val_bytes,
                     **c.info})
        print(f"  {c.name}: {c.steps} steps, {c.seconds:.0f} s, val {rows[-1]['bpb']:.4f} bits/byte",
              file=sys.stderr, flush=True)
    return {"rows": rows, "seconds": args.seconds, "clock": args.clock, "wall": wall, "load_before": load_before,
            "load_after": os.getloadavg(), "data": data.note, "val_bytes": val_bytes, "unseen_val_chars": unseen,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {result['threads']} "
             f"threads, {result['date']}; load average before {[round(x, 2) for x in result['load_before']]} / "
             f"after {[round(x, 2) for x in result['load_after']]}. Budget {result['seconds']:.0f} s of training "
             f"each ({result['clock']} clock; the run took {result['wall']:.0f} s of wall time), contestants interleaved step by step in one process. Data: {result['data']}; validation "
             f"{result['val_bytes']:,} bytes ({result['unseen_val_chars']} characters unseen in training).",
             "",
             "| recipe | params | vocab | precision | batch × context | steps | train s | tok/s | val bits/byte |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['vocab']:,} | {r['precision']} | "
                     f"{r['batch']} × {r['context']} | {r['steps']:,} | {r['seconds']:.0f} | {r['tok_s']:,.0f} | "
                     f"{r['bpb']:.4f} |")
    peers = [r for r in rows if r["name"].startswith("peer")]
    ours = [r for r in rows if r["name"].startswith("ours")]
    if peers and ours:
        best_peer = min(peers, key=lambda r: r["bpb"])
        lines += ["", "ours / best peer (bits per byte): " + ", ".join(
            f"{r['name'].removeprefix('ours: ')} {r['bpb'] / best_peer['bpb']:.3f}" for r in ours)
            + " (target ≤ 0.75)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=75.0,
                        help="training clock per contestant (default 75: the pipeline's train stage)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what the budget counts: wall "
                        "seconds, or process CPU seconds per thread (steadier on a shared machine)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variant", action="append", help="ours with train/model overrides: 'key=value,...' "
                        "or 'default' (repeatable; default: one, params.yaml as is)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="only our variants (recipe sweeps)")
    parser.add_argument("--no-peer-documented", dest="peer_documented", action="store_false",
                        help="skip the documented 2000-iteration peer run")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/README.md")
    parser.add_argument("--out", type=Path, default=Path("bench/out/recipe.json"))
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    return finish(result, table(result), args.out, args.write, "recipe",
                  "Our default recipe vs nanoGPT's CPU recipe at equal training time (bench/bench_recipe.py)")


# what `make repro`'s train stage runs under: the Makefile's malloc settings and libgomp's default wait policy (spin a
# while between parallel ops; PASSIVE, which the `gpt` command sets on a busy machine, made the tiny preset's steps
# 1.3x slower on the idle 2-core Xeon); both recipes run under the same environment. Run it on an idle machine.
RUN_ENV = MALLOC_ENV


def with_run_env(module: str = "bench.bench_recipe") -> None:
    """Re-execute `python -m module` under RUN_ENV unless already there (glibc and OpenMP read these at start)."""
    if any(os.environ.get(k) is None for k in RUN_ENV):
        env = {**RUN_ENV, **os.environ}
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


if __name__ == "__main__":
    with_run_env()
    main()
