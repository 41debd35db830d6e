"""bench/bench_recipe.py and bench_tokens_to_target.py: the scoring, the peer's schedule and character ids, the
turn-taking, and both scripts end to end on a tiny fixture with a tiny budget."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import yaml

from bench.bench_recipe import Contestant, PeerRecipe, char_streams, race, stream_nats
from tests.project_params import project_params


@pytest.mark.parametrize(("n", "context"), [(10, 3), (10, 9), (10, 64), (65, 64), (66, 64)])
def test_stream_nats_scores_every_token_after_the_first_once(n, context):
    vocab = 7
    stream = torch.arange(n) % vocab
    seen = []

    def uniform(inputs):
        seen.append(inputs.shape)
        return torch.zeros(*inputs.shape, vocab)

    nats, scored = stream_nats(uniform, stream, context, batch_size=2)
    assert scored == n - 1
    assert nats == pytest.approx((n - 1) * math.log(vocab))
    assert all(shape[1] <= context for shape in seen)


def test_stream_nats_equals_one_forward_when_the_context_covers_the_stream():
    torch.manual_seed(0)
    table = torch.randn(5, 5)
    stream = torch.randint(0, 5, (40,))

    def bigram(inputs):  # logits depend on the current token only: windows change nothing
        return table[inputs]

    whole = torch.nn.functional.cross_entropy(table[stream[:-1]], stream[1:], reduction="sum")
    assert stream_nats(bigram, stream, 7)[0] == pytest.approx(float(whole), rel=1e-6)


def test_peer_schedule_is_nanogpts():
    r = PeerRecipe()
    assert r.lr(0) == pytest.approx(1e-3 / 101)
    assert r.lr(100) == pytest.approx(1e-3)
    assert r.lr((100 + 2000) / 2) == pytest.approx((1e-3 + 1e-4) / 2)
    assert r.lr(2000) == pytest.approx(1e-4) and r.lr(5000) == 1e-4


def test_char_streams_round_trip_and_unseen_characters():
    train, val = ["ab", "ca✓"], ["abz"]
    train_ids, val_ids, vocab, unseen = char_streams(train, val)
    chars = sorted(set("abc✓\x00"))
    assert vocab == len(chars) + 1 and unseen == 1
    assert "".join(chars[i] for i in train_ids) == "ab\x00ca✓\x00"
    assert val_ids.tolist() == [chars.index("a"), chars.index("b"), vocab - 1, chars.index("\x00")]


def test_race_gives_each_contestant_the_budget_taking_turns():
    order = []

    def stepper(name, seconds):
        def step(progress):
            order.append((name, progress))
            time.sleep(seconds)
            return 0.0
        return step

    fast = Contestant("fast", stepper("fast", 0.002), lambda: 0.0)
    slow = Contestant("slow", stepper("slow", 0.01), lambda: 0.0)
    capped = Contestant("capped", stepper("capped", 0.002), lambda: 0.0, max_steps=3)
    race([fast, slow, capped], budget=0.1)
    assert fast.seconds >= 0.1 and slow.seconds >= 0.1 and capped.steps == 3
    assert fast.steps > slow.steps
    assert fast.seconds < 0.1 + 0.05 and slow.seconds < 0.1 + 0.05  # stops right after its budget
    progress = [p for name, p in order if name == "slow"]
    assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] < 1.0


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A corpus, tokenizer and shards like the pipeline's, and a params.yaml pointing at them (tiny model)."""
    from gpt.data.corpus import CorpusWriter
    from gpt.data.tokenize import TokenizeConfig, tokenize_split
    from gpt.tokenizer import TokenizerConfig, train_tokenizer

    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    words = "the model reads text and writes a story about cats dogs birds trees rivers".split()
    rows = [{"id": str(i), "text": " ".join(rng.choice(words, 60)), "source": "t", "lang": "en",
             "split": "val" if i % 10 == 0 else "train"} for i in range(120)]
    with CorpusWriter(root / "corpus") as writer:
        writer.write(rows)
    tok = train_tokenizer([r["text"] for r in rows], TokenizerConfig(vocab_size=320), root / "tok")
    for split in ("train", "val"):
        tokenize_split(tok, root / "corpus", split, root / "shards" / split, TokenizeConfig())
    params = project_params({
        "paths": {"augmented": str(root / "corpus"), "tokenizer": str(root / "tok"), "shards": str(root / "shards")},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "train": {"seq_len": 32, "batch_size": 4, "max_steps": 20, "warmup_steps": 2},
    })
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.mark.slow
def test_bench_recipe_runs_on_a_tiny_budget(tiny_pipeline, tmp_path):
    from bench import bench_recipe

    result = bench_recipe.main(["--seconds", "0.5", "--params", str(tiny_pipeline / "params.yaml"),
                                "--variant", "default", "--variant", "optimizer=muon,d_model=64",
                                "--out", str(tmp_path / "r.json")])
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["ours: params.yaml default", "ours: optimizer=muon,d_model=64"]
    assert len(names) == 4 and all(n.startswith("peer") for n in names[2:])
    for row in result["rows"]:
        assert row["steps"] >= 1 and row["seconds"] >= 0.5 and 0 < row["bpb"] < 20
    assert result["rows"][1]["params"] > result["rows"][0]["params"]


@pytest.mark.slow
def test_bench_tokens_to_target_runs(tiny_pipeline, tmp_path):
    from bench import bench_tokens_to_target

    result = bench_tokens_to_target.main(["--steps", "4", "--eval-every", "2", "--eval-windows", "4",
                                          "--adamw-lrs", "3.0e-3", "--muon-lrs", "2.0e-2", "--params",
                                          str(tiny_pipeline / "params.yaml"), "--out", str(tmp_path / "t.json")])
    assert [r["optimizer"] for r in result["runs"]] == ["adamw", "muon"]
    assert all([p[0] for p in r["curve"]] == [2, 4] for r in result["runs"])
    assert bench_tokens_to_target.to_target(result["runs"][0]["curve"], result["runs"][0]["curve"][-1][2], 1)[0] <= 4


def test_race_on_a_given_clock_counts_only_each_contestants_own_steps():
    now = [0.0]

    def clock():
        return now[0]

    def costs(seconds):
        def step(progress):
            now[0] += seconds
            return 0.0
        return step

    cheap = Contestant("cheap", costs(1.0), lambda: 0.0)
    dear = Contestant("dear", costs(3.0), lambda: 0.0)
    race([cheap, dear], budget=10.0, clock=clock)
    assert (cheap.steps, cheap.seconds) == (10, 10.0) and (dear.steps, dear.seconds) == (4, 12.0)
