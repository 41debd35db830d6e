"""The prepare → tokenizer → tokenize stage scripts in a temp project (no DVC): outputs, metrics, clean errors."""

from __future__ import annotations

import json

import pytest

from gpt.data import check_raw
from gpt.data.shards import TokenShards
from gpt.errors import run_main
from gpt.tokenizer import Tokenizer
from stages import prepare, tokenize, tokenizer
from tests.project_params import write_params

PARAMS = {
    # augmented = cleaned: the tokenizer/tokenize stages read paths.augmented; here without the augment stage
    "paths": {"raw": "data/raw", "cleaned": "data/cleaned", "augmented": "data/cleaned", "tokenizer": "data/tokenizer",
              "shards": "data/shards", "metrics": "metrics"},
    "prepare": {"sources": [{"kind": "builtin", "max_documents": 40}, {"kind": "files"}],
                "split": {"val_fraction": 0.2}},
    "tokenizer": {"vocab_size": 600},
    "tokenize": {"shard_tokens": 4096},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/mine.txt").write_text("My own notes about tokenizers and shards. " * 20)
    write_params(tmp_path, PARAMS)
    return tmp_path


def test_stages_in_order(project, capsys):
    prepare.main()
    tokenizer.main()
    tokenize.main()
    metrics = {name: json.loads((project / f"metrics/{name}.json").read_text()) for name in
               ("prepare", "tokenizer", "tokenize")}
    assert metrics["prepare"]["documents_by_source"]["file"] == 1
    tok = Tokenizer.load(project / "data/tokenizer")
    assert metrics["tokenizer"]["vocab_size"] == tok.vocab_size == 600
    assert metrics["tokenizer"]["val"]["byte_fallback_rate"] < 0.05
    for split in ("train", "val"):
        shards = TokenShards(project / "data/shards" / split, tokenizer_sha256=tok.sha256, vocab_size=600)
        assert shards.num_tokens == metrics["tokenize"][split]["num_tokens"] > 0
        assert shards.num_bytes == metrics["prepare"]["splits"][split]["bytes"]
    assert metrics["tokenize"]["throughput"]["mb_per_second"] > 0
    assert [p.name for p in (project / "data").iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def _error_line(main, capsys) -> str:
    """Run a stage entry point the way `python -m stages.x` does; return its one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_stage_errors_are_one_line_messages(project, capsys):
    params = dict(PARAMS, prepare={"sources": [{"kind": "files"}], "clean": {"min_chars": 10_000}})
    write_params(project, params)
    assert _error_line(prepare.main, capsys).startswith("error: prepare: no documents left")
    write_params(project, dict(PARAMS, tokenizer={"vocab_sise": 600}))
    assert _error_line(tokenizer.main, capsys).startswith("error: tokenizer: unknown key")
    # every stage validates the whole file: a slip in another stage's section stops this one too
    assert _error_line(prepare.main, capsys).startswith("error: tokenizer: unknown key")
    write_params(project, PARAMS)
    assert "not found" in _error_line(tokenize.main, capsys)


def test_data_errors_are_one_line_naming_source_link_and_special_token(project, capsys):
    (project / "data/raw/mine.jsonl").write_text('{"content": "my text"}\n')
    params = dict(PARAMS, prepare={"sources": [{"kind": "files", "glob": "*.jsonl"}]})
    write_params(project, params)
    err = _error_line(prepare.main, capsys)
    assert "prepare.sources[0]" in err and "text_field 'text'" in err and "['content']" in err
    (project / "data/raw/link.txt").symlink_to(project / "gone.txt")
    assert "data/raw/link.txt" in _error_line(prepare.main, capsys)
    assert "data/raw/link.txt" in _error_line(check_raw.main, capsys)  # `make repro` runs it before dvc repro
    (project / "data/raw/link.txt").unlink()
    check_raw.main()  # nothing dangling: passes quietly
    for tokens, problem in ((["<|a|>", "<s>"], "reserved"), (["<|a|>", "<|a|>"], "twice"), ([""], "non-empty")):
        write_params(project, dict(PARAMS, tokenizer={"special_tokens": tokens}))
        err = _error_line(tokenizer.main, capsys)
        assert err.startswith(f"error: tokenizer.special_tokens[{len(tokens) - 1}]: ") and problem in err
