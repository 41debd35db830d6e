"""Supervised fine-tuning data: the conversations a chat model is trained on, and checkable tasks to grade it.

- `data.py`    the `paths.sft_data` directory (train/val/heldout JSONL): readers, writers, ids and splits, and the
               input formats users bring (OpenAI/HF `messages`, Alpaca `instruction/input/output`)
- `tasks.py`   procedurally generated tasks with short exact answers (arithmetic, counting, sorting, formatting),
               the held-out split of their problem space, and `check_answer` (also for RL rewards)
- `docqa.py`   questions about the built-in corpus's documented functions, answered from their docstrings
- `build.py`   the `sft_data` stage's work: all sources → deduplicated, split, written files + metrics
- `config.py`  params.yaml `sft_data:`
- `packing.py`, `train.py`, `lora.py`, `chat_eval.py`  the `sft` and `chat_eval` stages' work: conversations
               packed into windows, fine-tuning (full or LoRA), held-out scores (see each module)
"""
