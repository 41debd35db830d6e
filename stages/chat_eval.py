"""`chat_eval` stage: the pretrained and the chat model on held-out checkable tasks → metrics/chat_eval.json.

    python -m stages.chat_eval

For each model: assistant-token loss/accuracy of the reference answers and the exact-match rate of greedy replies
(gpt/sft/chat_eval.py) on `sft.eval.max_items` rows of paths.sft_data/heldout.jsonl (tasks never trained on),
taken evenly across tasks. `dvc metrics diff` then shows what fine-tuning changed.
"""

from __future__ import annotations

import time

from gpt.atomic import write_json_atomic
from gpt.chat import ChatTemplate
from gpt.errors import run_main
from gpt.model_dir import load
from gpt.params import load_params
from gpt.sft.chat_eval import heldout_scores, select_items
from gpt.sft.data import HELDOUT_FILE, read_heldout


def main() -> None:
    params = load_params()
    paths, cfg = params.paths, params.sft.eval
    rows = select_items(read_heldout(paths.sft_data / HELDOUT_FILE), cfg.max_items)
    metrics = {}
    for name, directory in (("pretrained", paths.model), ("chat", paths.chat_model)):
        start = time.perf_counter()
        loaded = load(directory)
        metrics[name] = heldout_scores(loaded.model, ChatTemplate(loaded.tokenizer), rows, cfg.max_new_tokens)
        print(f"chat_eval: {name}: exact match {metrics[name]['exact_match']:.3f}, assistant-token loss "
              f"{metrics[name]['assistant_loss']:.3f} on {len(rows)} held-out items ({time.perf_counter() - start:.1f}s)")
    write_json_atomic(paths.metrics / "chat_eval.json", metrics)


if __name__ == "__main__":
    run_main(main)
