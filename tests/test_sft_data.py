"""The sft_data stage: input formats, skips by reason, docstring Q&A, checkable tasks, held-out disjointness,
determinism and the stage in a temp project."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from gpt.chat import parse_messages
from gpt.data.builtin import SOURCE_PREFIX, python_module_doc, stdlib_dir
from gpt.data.corpus import CorpusWriter
from gpt.errors import run_main
from gpt.sft import docqa
from gpt.sft.build import build_sft_data
from gpt.sft.config import ConversationSource, DocQAConfig, SftDataConfig, TasksConfig
from gpt.sft.data import (
    HELDOUT_FILE,
    TRAIN_FILE,
    VAL_FILE,
    RowError,
    conversation_id,
    read_conversations,
    read_heldout,
    row_messages,
)
from gpt.sft.tasks import GENERATORS, TASK_NAMES, TaskError, check_answer, is_heldout, sample_problems
from stages import sft_data
from tests.project_params import write_params

MATH_DOC = """Module mymath
Small arithmetic helpers for the tests.

mymath.double(x)
Return twice the value of x.

A second paragraph that is not part of the answer.

class mymath.Counter(object)
Count things one at a time.
    Indented detail.

mymath.Counter.bump(self)
Add one to the count and return the new value.

mymath._private(y)
Internal helper, never asked about.

mymath.code()
>>> code()
"""
VAL_DOC = "Module secretmod\nOnly in the validation split.\n\nsecretmod.hidden(z)\nNever a training question.\n"


def _write_corpus(directory: Path, docs: list[tuple[str, str, str]]) -> None:
    with CorpusWriter(directory) as writer:
        writer.write([{"id": f"doc{i}", "text": text, "source": f"{SOURCE_PREFIX}/{module}", "lang": "en",
                       "split": split} for i, (module, text, split) in enumerate(docs)])


@pytest.fixture
def corpus(tmp_path) -> Path:
    textwrap_doc = python_module_doc("textwrap", (stdlib_dir() / "textwrap.py").read_text(encoding="utf-8"))
    _write_corpus(tmp_path / "cleaned", [("mymath", MATH_DOC, "train"), ("textwrap", textwrap_doc, "train"),
                                         ("secretmod", VAL_DOC, "val")])
    return tmp_path / "cleaned"


def _small(**overrides) -> SftDataConfig:
    tasks = TasksConfig(per_task=15, heldout_per_task=5)
    return dataclasses.replace(SftDataConfig(tasks=tasks, docqa=DocQAConfig(max_items=50)), **overrides)


def _rows(directory: Path, split: str = "both") -> list[dict]:
    names = {"both": (TRAIN_FILE, VAL_FILE), "train": (TRAIN_FILE,), "val": (VAL_FILE,)}[split]
    return [row for name in names for row in read_conversations(directory / name)]


# ------------------------------------------------------------------------------------------------ input formats

def test_messages_and_alpaca_rows_become_validated_conversations():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    assert row_messages({"messages": messages}) == messages
    assert row_messages({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}) == [
        {"role": "user", "content": "Add the numbers.\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert row_messages({"instruction": "Say hi.", "input": "", "output": "hi", "system": "S"}) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"}]
    with pytest.raises(RowError) as err:  # forced format that does not fit the row
        row_messages({"instruction": "x", "output": "y"}, "messages")
    assert err.value.reason == "empty"


@pytest.mark.parametrize(("row", "reason"), [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty_assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "bad_order"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "bad_message"),
    ({"instruction": "q", "output": ""}, "empty_assistant"),
    ({"instruction": "", "output": "a"}, "empty_user"),
    ({"prompt": "q", "completion": "a"}, "unknown_format"),
    (["not", "an", "object"], "not_an_object"),
])
def test_a_malformed_row_names_its_reason(row, reason):
    with pytest.raises(RowError) as err:
        row_messages(row)
    assert err.value.reason == reason


def test_user_files_are_read_and_bad_rows_counted_by_reason(tmp_path, corpus):
    good = {"messages": [{"role": "user", "content": "What is DVC?"}, {"role": "assistant", "content": "A tool."}]}
    lines = [json.dumps(good).encode(), json.dumps(good).encode(),  # the second is a duplicate
             json.dumps({"instruction": "Name a colour.", "output": "Blue."}).encode(),
             b"{not json", "caf\u00e9".encode("latin-1"), b"",
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
             json.dumps({"instruction": "Long.", "output": "x" * 5000}).encode()]
    conversations = tmp_path / "conversations"
    conversations.mkdir()
    (conversations / "mine.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (conversations / "more.json").write_text(json.dumps([{"instruction": "Say yes.", "input": "", "output": "yes"}]))
    cfg = _small(sources=[ConversationSource("*.jsonl"), ConversationSource("more.json", "alpaca")])
    metrics = build_sft_data(cfg, corpus, conversations, tmp_path / "sft")
    assert metrics["skipped"] == {"bad_json": 1, "duplicate": 1, "not_utf8": 1, "too_long": 1, "unknown_role": 1}
    assert metrics["by_source"]["file:mine.jsonl"] == 2 and metrics["by_source"]["file:more.json"] == 1
    mine = [row for row in _rows(tmp_path / "sft") if row["source"].startswith("file:")]
    assert sorted(row["messages"][-1]["content"] for row in mine) == ["A tool.", "Blue.", "yes"]


def test_a_source_that_yields_nothing_fails_naming_it(tmp_path, corpus):
    conversations = tmp_path / "conversations"
    conversations.mkdir()
    with pytest.raises(Exception, match=r"sft_data.sources\[0\] \('\*.jsonl'.*no file matched"):
        build_sft_data(_small(sources=[ConversationSource("*.jsonl")]), corpus, conversations, tmp_path / "sft")
    (conversations / "bad.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(Exception, match=r"sources\[0\].*1 file\(s\) but no usable conversation.*'bad_json': 1"):
        build_sft_data(_small(sources=[ConversationSource("*.jsonl")]), corpus, conversations, tmp_path / "sft")
    assert not (tmp_path / "sft").exists()


# ------------------------------------------------------------------------------------------------ docstring Q&A

def test_doc_entries_read_the_builtin_corpus_format():
    entries = {e.name: e for e in docqa.doc_entries(MATH_DOC, "mymath")}
    assert [(e.name, e.kind) for e in entries.values()] == [
        ("mymath", "module"), ("mymath.double", "function"), ("mymath.Counter", "class"),
        ("mymath.Counter.bump", "function"), ("mymath._private", "function"), ("mymath.code", "function")]
    assert docqa.summary(entries["mymath.double"].doc, 300) == "Return twice the value of x."
    assert docqa.summary(entries["mymath.code"].doc, 300) is None  # code, not prose
    assert docqa.summary("dedent(text) -> str\n\nRemove common leading whitespace.", 300) == \
        "Remove common leading whitespace."
    # a docstring line that mentions another module's call is not a header
    assert [e.name for e in docqa.doc_entries("Module m\nDoc.\n\nos.path.join(a)\nnot m's\n", "m")] == ["m"]


def test_docqa_asks_about_train_split_names_only(tmp_path, corpus):
    build_sft_data(_small(tasks=TasksConfig(names=[], per_task=0, heldout_per_task=0)), corpus,
                   tmp_path / "none", tmp_path / "sft")
    rows = _rows(tmp_path / "sft")
    text = json.dumps(rows)
    assert "secretmod" not in text and "_private" not in text
    answers = {m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"}
    assert "Return twice the value of x." in answers
    assert any("textwrap.dedent" in m["content"] for row in rows for m in row["messages"])


# ------------------------------------------------------------------------------------------------ tasks

@pytest.mark.parametrize("task", TASK_NAMES)
def test_check_answer_accepts_the_answer_and_rejects_wrong_ones(task):
    rng = random.Random(task)
    for _ in range(20):
        problem = GENERATORS[task](rng)
        assert check_answer(task, problem.answer, problem.answer)
        assert check_answer(task, f"  {problem.answer}.\n", problem.answer)  # whitespace, final period
        assert not check_answer(task, problem.answer + "0", problem.answer)
        assert not check_answer(task, f"The answer is {problem.answer}", problem.answer)
        assert not check_answer(task, "", problem.answer)


def test_check_answer_normalises_lists_quotes_but_not_case():
    assert check_answer("sort_numbers", "1,2 ,  3", "1, 2, 3")
    assert check_answer("uppercase", "`HELLO WORLD`", "HELLO WORLD")
    assert not check_answer("uppercase", "hello world", "HELLO WORLD")
    assert not check_answer("sort_numbers", "3, 2, 1", "1, 2, 3")
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        check_answer("nope", "1", "1")


def test_generated_answers_are_right():
    rng = random.Random(0)
    for _ in range(50):
        p = GENERATORS["add"](rng)
        a, b = map(int, p.key.split(","))
        assert p.answer == str(a + b) and str(a) in p.prompt and str(b) in p.prompt
        p = GENERATORS["sort_words"](rng)
        assert p.answer.split(", ") == sorted(p.key.split(", "))
        p = GENERATORS["count_letter"](rng)
        letter, word = p.key.split(",")
        assert p.answer == str(word.count(letter))


def test_heldout_problems_are_never_on_the_training_side():
    for task in TASK_NAMES:
        train = sample_problems(task, 150, seed=3, heldout=False, heldout_fraction=0.2, salt="s")
        heldout = sample_problems(task, 20, seed=3, heldout=True, heldout_fraction=0.2, salt="s")
        assert {p.key for p in train}.isdisjoint(p.key for p in heldout)
        assert all(is_heldout(p, 0.2, "s") for p in heldout) and not any(is_heldout(p, 0.2, "s") for p in train)
        assert len({p.key for p in heldout}) == 20


def test_no_heldout_prompt_reaches_train_or_val(tmp_path, corpus):
    build_sft_data(_small(tasks=TasksConfig(per_task=100, heldout_per_task=20), multi_turn_fraction=0.5,
                          system_fraction=0.5), corpus, tmp_path / "none", tmp_path / "sft")
    heldout = read_heldout(tmp_path / "sft" / HELDOUT_FILE)
    assert len(heldout) == 20 * len(TASK_NAMES)
    prompts = {m["content"] for row in _rows(tmp_path / "sft") for m in row["messages"] if m["role"] == "user"}
    assert prompts and not prompts & {row["messages"][-1]["content"] for row in heldout}
    for row in heldout:
        assert row["messages"][-1]["role"] == "user" and row["task"] in TASK_NAMES and row["answer"]
        assert row["id"] == conversation_id(row["messages"])


# ------------------------------------------------------------------------------------------------ output files

def test_same_params_give_byte_identical_files_and_valid_rows(tmp_path, corpus):
    for name in ("a", "b"):
        build_sft_data(_small(), corpus, tmp_path / "none", tmp_path / name)
    for name in (TRAIN_FILE, VAL_FILE, HELDOUT_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = _rows(tmp_path / "a")
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        parse_messages(row["messages"], require_assistant_last=True)
        assert row["id"] == conversation_id(row["messages"])
    build_sft_data(_small(seed=1), corpus, tmp_path / "none", tmp_path / "c")
    assert (tmp_path / "a" / TRAIN_FILE).read_bytes() != (tmp_path / "c" / TRAIN_FILE).read_bytes()


def test_adding_rows_never_moves_old_ones_between_splits(tmp_path, corpus):
    conversations = tmp_path / "conversations"
    conversations.mkdir()
    row = {"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]}
    (conversations / "a.jsonl").write_text(json.dumps(row) + "\n")
    cfg = _small(sources=[ConversationSource("*.jsonl")], val_fraction=0.3)
    build_sft_data(cfg, corpus, conversations, tmp_path / "before")
    more = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(1, 40)]
    (conversations / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in more))
    build_sft_data(cfg, corpus, conversations, tmp_path / "after")
    for split in ("train", "val"):
        before = {r["id"] for r in _rows(tmp_path / "before", split)}
        assert before <= {r["id"] for r in _rows(tmp_path / "after", split)}


# ------------------------------------------------------------------------------------------------ the stage

PARAMS = {
    "paths": {"cleaned": "data/cleaned", "conversations": "data/conversations", "sft_data": "data/sft",
              "metrics": "metrics"},
    "sft_data": {"tasks": {"per_task": 10, "heldout_per_task": 3}, "docqa": {"max_items": 20},
                 "sources": [{"glob": "*.jsonl"}]},
}


@pytest.fixture
def project(tmp_path, monkeypatch, corpus):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    corpus.rename(tmp_path / "data/cleaned")
    (tmp_path / "data/conversations").mkdir()
    (tmp_path / "data/conversations/chat.jsonl").write_text(
        json.dumps({"instruction": "Greet me.", "output": "Hello!"}) + "\n{bad\n")
    write_params(tmp_path, PARAMS)
    return tmp_path


def test_the_stage_writes_the_files_and_metrics(project, capsys):
    sft_data.main()
    metrics = json.loads((project / "metrics/sft_data.json").read_text())
    assert metrics["heldout"] == 3 * len(TASK_NAMES)
    assert metrics["by_source"]["file:chat.jsonl"] == 1 and metrics["by_source"]["task:add"] <= 10
    assert metrics["skipped"] == {"bad_json": 1}
    rows = _rows(project / "data/sft")
    assert sum(metrics["conversations"].values()) == len(rows) == sum(metrics["by_source"].values())
    assert "sft_data:" in capsys.readouterr().out
    assert [p.name for p in (project / "data").iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_the_stage_fails_with_one_line(project, capsys):
    write_params(project, {**PARAMS, "sft_data": {"sources": [{"glob": "nothing/*.jsonl"}]}})
    with pytest.raises(SystemExit) as exit_info:
        run_main(sft_data.main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sft_data.sources[0] ('nothing/*.jsonl'") and "\n" not in err
    write_params(project, {**PARAMS, "sft_data": {"tasks": {"names": ["add", "divide"]}}})
    with pytest.raises(SystemExit):
        run_main(sft_data.main)
    assert "sft_data.tasks.names: unknown task(s) ['divide']" in capsys.readouterr().err
