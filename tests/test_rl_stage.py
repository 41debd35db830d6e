"""The `rl` stage (issue 14): params defaults, think-aware rewards, the stage on a tiny fixture, show/hide thinking."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from gpt.chat import split_reply
from gpt.config import ConfigError
from gpt.generate import Delta, mark_thinking
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model_dir import Lineage, load_model, read_lineage, write_model_dir
from gpt.params import Params, load_params
from gpt.rl.config import RLConfig
from gpt.rl.rollout import Rollout, task_rewards
from gpt.sft.tasks import Problem
from gpt.tokenizer import TokenizerConfig, train_tokenizer
from tests.project_params import PROJECT_PARAMS, write_params

OPEN, CLOSE, END = 20, 21, 1


class PieceTokenizer:
    """ids 2..19 are characters 'a'.. / digits; 20/21 the think control symbols (decode to "")."""

    chars = "0123456789abcdefgh"

    def piece_to_id(self, piece: str) -> int:
        return {"<think>": OPEN, "</think>": CLOSE}.get(piece, -1)

    def id_to_piece(self, i: int) -> str:
        return {OPEN: "<think>", CLOSE: "</think>"}.get(i, "?")

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 2] for i in ids if 2 <= i < 20)

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) + 2 for c in text]


def test_rl_section_defaults_equal_params_yaml_and_reject_bad_values():
    assert load_params(PROJECT_PARAMS).rl == Params().rl == RLConfig()
    with pytest.raises(ConfigError, match="rl.tasks"):
        RLConfig(tasks=["no_such_task"])
    with pytest.raises(ConfigError, match="rl.steps"):
        RLConfig(steps=0)


def _rollout(rows: list[list[int]], stopped: list[bool]) -> Rollout:
    N = max(len(r) for r in rows) + 1
    ids = torch.full((len(rows), 1 + N), END)
    mask = torch.zeros(len(rows), N)
    for i, (row, stop) in enumerate(zip(rows, stopped)):
        ids[i, 1:1 + len(row)] = torch.tensor(row)
        mask[i, :len(row) + int(stop)] = 1
    return Rollout(ids, torch.ones_like(ids), mask, torch.zeros(len(rows), N), 1, len(rows), torch.tensor(stopped))


def test_task_rewards_score_the_answer_after_think_and_the_format():
    tok = PieceTokenizer()
    seven, eight = tok.encode("7"), tok.encode("8")
    rows = [seven,                                   # plain right answer, closed: correct + formatted
            [OPEN, *tok.encode("34"), CLOSE, *seven],  # thinks, then the right answer
            [OPEN, *tok.encode("7"), CLOSE, *eight],   # the answer is in the thinking only: wrong
            [OPEN, *seven],                            # never closes the thinking: no answer
            [OPEN, CLOSE],                             # empty answer: not formatted
            [*seven, OPEN, CLOSE],                     # thinking after the answer: malformed
            seven]                                     # right but cut at max_new_tokens
    stopped = [True] * 6 + [False]
    problems = [Problem("add", "add:3,4", "What is 3 + 4?", "7")]
    out = task_rewards(tok, problems, _rollout(rows, stopped), format_weight=0.5)
    assert out.correct.tolist() == [1, 1, 0, 0, 0, 0, 1]
    assert out.formatted.tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert out.reward.tolist() == pytest.approx([1.5, 1.5, 0.5, 0, 0, 0, 1])
    assert out.answers[1] == "7" and out.thinking[1] == "34"
    assert split_reply([5, 6], None).answer == [5, 6]  # a tokenizer without think tokens: all answer


def test_show_or_hide_thinking_in_the_chat_stream():
    deltas = [Delta("", 1, token_ids=[OPEN]), Delta("ab", 2, token_ids=[12]), Delta("", 3, token_ids=[CLOSE]),
              Delta("42", 4, "stop", token_ids=[6])]
    shown = "".join(d.text for d in mark_thinking(iter(deltas), (OPEN, CLOSE), show=True))
    hidden = list(mark_thinking(iter(deltas), (OPEN, CLOSE), show=False))
    assert shown == "<think>ab</think>42"
    assert "".join(d.text for d in hidden) == "42" and hidden[-1].finish_reason == "stop"
    from gpt.serve.chat import ChatRequest

    assert ChatRequest(messages=[]).show_thinking is False  # the front door hides it unless asked


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tokenizer with the chat + think tokens and a tiny random 'chat model' directory written from it."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("rl")
    texts = [topics[k] for k in sorted(topics)][:40]
    tok = train_tokenizer((line for t in texts for line in t.splitlines() if line.strip()),
                          TokenizerConfig(vocab_size=400), root / "tok")
    assert tok.piece_to_id("<think>") >= 0 and tok.piece_to_id("</think>") >= 0
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                               max_seq_len=96, dropout=0.0))
    write_model_dir(model, root / "data/chat-model", tok.path, Lineage(tokenizer_sha256=tok.sha256))
    return root


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_stage_writes_a_loadable_model_and_metrics(chat_model_dir, tmp_path, monkeypatch, algorithm):
    import shutil

    shutil.copytree(chat_model_dir / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"rl": {"algorithm": algorithm, "steps": 2, "prompts_per_step": 2, "group_size": 2,
                                   "max_new_tokens": 4, "heldout_items": 2, "eval_every": 1, "kl_coef": 0.1,
                                   "tasks": ["count_letter", "add"], "samples": 2}})
    from stages import rl

    rl.main()
    metrics = json.loads((tmp_path / "metrics/rl.json").read_text())
    assert metrics["heldout"]["before"]["items"] == 4 and [e["step"] for e in metrics["evals"]] == [0, 1, 2]
    assert metrics["train"]["algorithm"] == algorithm and metrics["train"]["steps"] == 2
    curve = (tmp_path / "metrics/rl/plots/metrics/format_rate.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in curve[1:]] == ["1", "2"]
    for name in ("reward", "correct", "kl", "entropy", "completion_length", "clip_fraction"):
        assert (tmp_path / f"metrics/rl/plots/metrics/{name}.tsv").is_file(), name
    assert "## " in (tmp_path / "metrics/rl_samples.md").read_text()
    out = tmp_path / "data/rl-model"
    parent_weights = (tmp_path / "data/chat-model/model.safetensors").read_bytes()
    assert read_lineage(out).extra["parent"]["weights_sha256"] == hashlib.sha256(parent_weights).hexdigest()
    assert set(load_model(out).state_dict()) == set(load_model(tmp_path / "data/chat-model").state_dict())


def test_split_problems_replaces_prompts_that_do_not_fit_and_keeps_the_rest():
    from gpt.rl.run import split_problems

    cfg = RLConfig(steps=5, prompts_per_step=2, heldout_items=6, tasks=["count_words", "add"])
    train, heldout = split_problems(cfg, 0.2, "v1")
    assert [p.task for p in train] == ["count_words"] * 10 + ["add"] * 10 and len(heldout) == 12
    assert not {(p.task, p.key) for p in train} & {(p.task, p.key) for p in heldout}
    too_long = {p.prompt for p in train[:3]}
    train2, heldout2 = split_problems(cfg, 0.2, "v1", fits=lambda p: p.prompt not in too_long)
    assert train2[:7] == train[3:10] and train2[10:] == train[10:] and heldout2 == heldout
    assert len(train2) == 20 and not too_long & {p.prompt for p in train2}
