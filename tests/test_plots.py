"""gpt/plots.py: the training-curves PNG from DVCLive TSVs (written by the real TrainLogger), the unigram baseline
in nats/token, and missing or broken inputs."""

from __future__ import annotations

import json
import logging
import math

import pytest
from PIL import Image

from gpt.eval import bits_per_byte
from gpt.plots import (
    DPI,
    FIGSIZE,
    baseline_from_eval,
    read_series,
    render_training_plot,
    unigram_loss_per_token,
)

EXPECTED_SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


@pytest.fixture
def live_dir(tmp_path, monkeypatch):
    """Six logged steps, val loss every third, exactly as the train stage's TrainLogger writes them."""
    # tmp_path is outside any git repo, so DVCLive needs no DVCLIVE_TEST (which, with dvcyaml=False, trips a
    # DVCLive 3.49 bug: os.fspath(False)).
    monkeypatch.delenv("DVCLIVE_TEST", raising=False)
    from gpt.train.metrics import TrainLogger

    directory = tmp_path / "train"
    logger = TrainLogger(directory)
    for step in range(1, 7):
        values = {"train/loss": 8.0 - step * 0.5, "lr": 1.0e-3 * min(step, 3) / 3, "grad_norm": 1.0 / step,
                  "tokens_per_s": 1000.0 + step, "mfu": 0.1, "tokens": 256 * step}
        if step % 3 == 0:
            values["val/loss"] = 8.2 - step * 0.5
        logger.log(step, values)
    logger.close()
    return directory


def _eval_json(path, step: int, val_loss=5.0, bpb=2.0, unigram_bpb=3.0):
    path.write_text(json.dumps({"val_loss": val_loss, "bits_per_byte": bpb, "unigram_bits_per_byte": unigram_bpb,
                                "model_step": step}))
    return path


def _assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == EXPECTED_SIZE
        assert "Software" not in image.info  # no matplotlib version stamp to churn the file


def test_renders_valid_png_deterministically(live_dir, tmp_path):
    eval_json = _eval_json(tmp_path / "eval.json", step=6)
    first, second = tmp_path / "a.png", tmp_path / "out" / "b.png"
    render_training_plot(live_dir, first, eval_json)
    render_training_plot(live_dir, second, eval_json)
    _assert_png(first)
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind


def test_baseline_line_is_drawn_only_with_a_matching_eval(live_dir, tmp_path):
    without = render_training_plot(live_dir, tmp_path / "without.png", None).read_bytes()
    matching = render_training_plot(live_dir, tmp_path / "with.png", _eval_json(tmp_path / "e6.json", step=6))
    stale = render_training_plot(live_dir, tmp_path / "stale.png", _eval_json(tmp_path / "e9.json", step=9))
    assert matching.read_bytes() != without
    assert stale.read_bytes() == without  # another run's eval: not comparable, left out
    assert baseline_from_eval(tmp_path / "e9.json", last_step=6.0) is None


def test_unigram_baseline_is_its_loss_per_token():
    """eval.json only has bits-per-byte for the baseline; converted back it must equal unigram nats / token."""
    tokens, split_tokens, split_bytes = 1000, 5000, 21000
    model_nats, unigram_nats = 4.2 * tokens, 6.9 * tokens
    metrics = {"val_loss": model_nats / tokens,
               "bits_per_byte": bits_per_byte(model_nats, tokens, split_tokens, split_bytes),
               "unigram_bits_per_byte": bits_per_byte(unigram_nats, tokens, split_tokens, split_bytes)}
    assert math.isclose(unigram_loss_per_token(metrics), unigram_nats / tokens, rel_tol=1e-12)
    assert unigram_loss_per_token({"val_loss": 4.0}) is None
    assert unigram_loss_per_token({**metrics, "bits_per_byte": 0.0}) is None


def test_missing_inputs_give_a_png_and_a_warning_naming_the_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gpt.plots"):
        out = render_training_plot(tmp_path / "no-such-dir", tmp_path / "empty.png", tmp_path / "no-eval.json")
    _assert_png(out)
    assert "train/loss.tsv is missing" in caplog.text and "tokens_per_s.tsv is missing" in caplog.text


def test_partial_logs_still_render(live_dir, tmp_path, caplog):
    (live_dir / "plots" / "metrics" / "lr.tsv").unlink()
    with caplog.at_level(logging.WARNING, logger="gpt.plots"):
        _assert_png(render_training_plot(live_dir, tmp_path / "partial.png"))
    assert "lr.tsv is missing" in caplog.text and "loss.tsv" not in caplog.text


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    tsv = tmp_path / "loss.tsv"
    tsv.write_text("step\tloss\n1\t3.5\n2\tnan\n3\toops\n4\n5\t2.5\n")
    with caplog.at_level(logging.WARNING, logger="gpt.plots"):
        series = read_series(tsv)
    assert series.steps == (1.0, 5.0) and series.values == (3.5, 2.5)
    assert "skipped 3 unparsable or non-finite rows" in caplog.text
    tsv.write_text("no header here\n")
    assert read_series(tsv) is None
