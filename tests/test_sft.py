"""Supervised fine-tuning: packing, assistant-only labels, token-weighted accumulation, and the sft + chat_eval
stages on a tiny fixture (full fine-tuning and LoRA both lower the assistant-token val loss)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from gpt.chat import ChatTemplate
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model.loss import IGNORE_INDEX
from gpt.model_dir import load, load_model, read_lineage
from gpt.sft.lora import ADAPTER_FILE, read_adapter
from gpt.sft.packing import PackedConversations, best_fit, pack_conversations, render_labeled
from gpt.tokenizer import Tokenizer
from gpt.train.device import Precision
from gpt.train.step import LabeledWindows, train_step
from tests.sft_workspace import build_workspace, write_params


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tokenizer + shards + SFT data, and a pretrained model (the train stage, 30 steps)."""
    root = build_workspace(tmp_path_factory.mktemp("sft"))
    from stages import train

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        write_params(root)
        train.main()
    return root


def conversation(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_best_fit_fills_the_tightest_window_and_never_splits():
    bins = best_fit([6, 5, 4, 3, 2], capacity=8)
    assert sorted(sorted(b) for b in bins) == [[0, 4], [1, 3], [2]]  # 6+2, 5+3, 4
    assert all(sum([6, 5, 4, 3, 2][i] for i in b) <= 8 for b in bins)


def test_packing_keeps_conversations_whole_and_labels_only_assistant_tokens(workspace):
    template = ChatTemplate(Tokenizer.load(workspace / "data/tokenizer"))
    rows = [conversation(f"Repeat the word {w}.", w) for w in ("apple", "river", "stone", "cloud", "green")]
    rows.append(conversation("Say something long. " * 30, "ok " * 40))  # longer than a window: cropped
    windows, labels, stats = pack_conversations(rows, template, seq_len=31, pad_id=0)
    rendered = [render_labeled(template, r["messages"]) for r in rows]
    assert windows.shape[1] == 32 and stats.conversations == 6 and stats.cropped_conversations == 1
    assert stats.cropped_tokens == len(rendered[-1][0]) - 32
    assert stats.cropped_fraction == pytest.approx(stats.cropped_tokens / sum(len(ids) for ids, _ in rendered))
    flat = [(windows[r].tolist(), labels[r].tolist()) for r in range(len(windows))]
    for ids, labs in rendered[:5]:  # each short conversation appears whole, contiguous, with its own labels
        assert any(any(w[i:i + len(ids)] == ids and lab[i:i + len(ids)] == labs for i in range(33 - len(ids)))
                   for w, lab in flat)
    ids, mask = template.render(rows[0]["messages"])
    labs = render_labeled(template, rows[0]["messages"])[1]
    assert [lab != IGNORE_INDEX for lab in labs] == [bool(m) for m in mask]
    assert labs[-1] == template.end_id  # the model learns to stop
    assert stats.assistant_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    windows = np.arange(10 * 5).reshape(10, 5)
    source = PackedConversations(windows, windows.copy())
    first_epoch = torch.cat([source.get_batch(s, 2, 4, seed=7).windows[:, 0] for s in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(0, 50, 5))
    assert torch.equal(source.get_batch(3, 2, 4, seed=7).windows, PackedConversations(windows, windows).get_batch(
        3, 2, 4, seed=7).windows)
    ranks = torch.cat([source.get_batch(1, 2, 4, 7, rank=r, world_size=2).windows for r in (0, 1)])
    assert torch.equal(ranks, source.get_batch(1, 4, 4, seed=7).windows)
    with pytest.raises(ValueError, match="seq_len 4"):
        source.get_batch(0, 2, 8, seed=7)


def test_labeled_accumulation_equals_one_batch_weighted_by_scored_tokens():
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50, (4, 17), generator=gen)
    labels = windows.clone()
    labels[0, :14] = IGNORE_INDEX  # rows score very different numbers of tokens
    labels[1, :3] = IGNORE_INDEX
    labels[3, 5:] = IGNORE_INDEX
    results = []
    for split in (1, 2, 4):
        torch.manual_seed(0)
        model = DecoderOnlyTransformer(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = LabeledWindows(windows, labels)
        step = train_step(model, optimizer, batch.chunk(split), Precision("fp32", "cpu"), 0.0)
        results.append((step.loss, model.state_dict()))
    for loss, state in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        assert all(torch.allclose(state[k], results[0][1][k], atol=1e-6) for k in state)


@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 16.0}], ids=["full", "lora"])
def test_sft_stage_lowers_assistant_loss_and_writes_a_chat_model(workspace, tmp_path, monkeypatch, lora):
    root = tmp_path / "ws"
    for part in ("data/tokenizer", "data/model", "data/sft"):
        shutil.copytree(workspace / part, root / part)
    monkeypatch.chdir(root)
    write_params(root, {"sft": {"lora": lora or {"rank": 0}, "lr": 1.0e-2 if lora else 3.0e-3}})  # LoRA: higher lr
    from stages import chat_eval, sft

    sft.main()
    metrics = json.loads((root / "metrics/sft.json").read_text())
    assert metrics["val"]["after"]["loss"] < metrics["val"]["before"]["loss"] - 0.5
    assert metrics["val"]["after"]["accuracy"] > metrics["val"]["before"]["accuracy"]
    assert metrics["packing"]["train"]["conversations"] == 240 and metrics["train"]["steps"] == 40
    curve = (root / "metrics/sft/plots/metrics/val/accuracy.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in curve[1:]] == ["20", "40"]
    chat = root / "data/chat-model"
    lineage = read_lineage(chat)
    weights = hashlib.sha256((root / "data/model/model.safetensors").read_bytes()).hexdigest()
    assert lineage.extra["parent"]["weights_sha256"] == weights
    assert lineage.val_loss == pytest.approx(metrics["val"]["after"]["loss"])
    names = {p.name for p in chat.iterdir()}
    plain = load_model(chat)  # merged weights: a plain model every consumer loads
    assert set(plain.state_dict()) == set(load_model(root / "data/model").state_dict())
    if lora:
        assert ADAPTER_FILE in names and metrics["lora"]["trainable"] < metrics["lora"]["total"] / 5
        assert metrics["lora"]["optimizer_state_bytes"] > 8 * metrics["lora"]["trainable"]
        cfg, tensors = read_adapter(chat / ADAPTER_FILE)
        assert cfg.rank == 4 and all(k.endswith(("lora_A", "lora_B")) for k in tensors)
        base = load_model(root / "data/model").state_dict()
        changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, base[k])]
        assert changed and all(".attn." in k or ".mlp." in k for k in changed)  # only adapted layers
    else:
        assert ADAPTER_FILE not in names and metrics["lora"] is None
    assert "assistant (chat model)" in (root / "metrics/sft_samples.md").read_text()
    assert load(chat).tokenizer.sha256 == Tokenizer.load(root / "data/model").sha256

    chat_eval.main()
    scores = json.loads((root / "metrics/chat_eval.json").read_text())
    assert set(scores) == {"pretrained", "chat"} and scores["chat"]["items"] == 10
    assert scores["chat"]["assistant_loss"] < scores["pretrained"]["assistant_loss"]
    assert 0.0 <= scores["chat"]["exact_match"] <= 1.0 and set(scores["chat"]["per_task"]) == {"add"}


def test_chat_eval_skips_and_counts_held_out_items_longer_than_the_context(workspace):
    from gpt.sft.chat_eval import heldout_scores

    loaded = load(workspace / "data/model")
    rows = [{"id": "a", "task": "add", "messages": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"},
            {"id": "b", "task": "add", "messages": [{"role": "user", "content": "What is 1 + 2? " * 40}],
             "answer": "3"}]
    scores = heldout_scores(loaded.model, ChatTemplate(loaded.tokenizer), rows, max_new_tokens=4)
    assert scores["items"] == 1 and scores["skipped_too_long"] == 1
