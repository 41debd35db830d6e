"""One RL run on the checkable SFT tasks: the `rl` stage's logic (stages/rl.py only reads params and writes files).

`run_rl` loads the chat model in fp32 (the training model, not the inference-prepared one), draws each step's prompts
from the training side of the task split (`gpt.sft.tasks.sample_problems(heldout=False)`), calls `rl_step`, logs the
step's statistics, and measures held-out exact match (greedy, the answer after `</think>` checked) before, every
`eval_every` steps and after. A frozen reference copy is kept only when `kl_coef > 0`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from gpt.chat import ChatTemplate, split_reply, think_ids
from gpt.errors import GptError
from gpt.generate import SamplingSpec, generate_chat
from gpt.rl.config import RLConfig
from gpt.rl.loop import rl_step
from gpt.rl.ppo import ValueHead
from gpt.rl.rollout import Rollout, task_rewards
from gpt.sft.tasks import Problem, check_answer, sample_problems

Logger = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass
class RLResult:
    model: torch.nn.Module
    before: dict[str, Any]
    after: dict[str, Any]
    history: list[dict[str, float]]  # per step
    evals: list[dict[str, Any]]  # {"step", "exact_match"} at every evaluation
    samples: list[dict[str, str]]  # the last step's completions (prompt, thinking, answer, reward)
    seconds: float


def split_problems(cfg: RLConfig, heldout_fraction: float, salt: str,
                   fits: Callable[[Problem], bool] = lambda problem: True) -> tuple[list[Problem], list[Problem]]:
    """(training-side pool, held-out problems): both from gpt.sft.tasks, split by its hash, so they never meet.

    Per task, `steps * prompts_per_step` training problems and `heldout_items` held-out ones among those that `fits`
    (the prompt leaves room for the completion); a few spare problems are drawn for the ones that do not fit. The
    draws are sequential, so when all fit the lists are the first ones drawn, whatever the spare."""
    pool_size = cfg.steps * cfg.prompts_per_step

    def draw(task: str, count: int, seed: int, heldout: bool) -> list[Problem]:
        drawn = sample_problems(task, count + count // 4 + 8, seed, heldout=heldout,
                                heldout_fraction=heldout_fraction, salt=salt)
        return [p for p in drawn if fits(p)][:count]

    train = [p for task in cfg.tasks for p in draw(task, pool_size, cfg.seed, False)]
    # the held-out problems do not depend on rl.seed, so runs with different seeds are scored on the same items
    heldout = [p for task in cfg.tasks for p in draw(task, cfg.heldout_items, 0, True)]
    return train, heldout


class RLError(GptError, ValueError):
    pass


def exact_match(model: torch.nn.Module, template: ChatTemplate, problems: list[Problem],
                max_new_tokens: int) -> dict[str, Any]:
    """Greedy replies to held-out problems; a reply is right when its answer (after `</think>`) checks."""
    think = think_ids(template.tokenizer)
    right, total = Counter(), Counter()
    was_training = model.training
    model.eval()
    for problem in problems:
        reply = generate_chat(model, template, [{"role": "user", "content": problem.prompt}],
                              SamplingSpec(max_new_tokens, temperature=0.0))
        answer = template.tokenizer.decode(split_reply(reply.token_ids, think).answer)
        total[problem.task] += 1
        right[problem.task] += check_answer(problem.task, answer, problem.answer)
    model.train(was_training)
    return {"exact_match": sum(right.values()) / max(1, len(problems)), "items": len(problems),
            "per_task": {task: right[task] / total[task] for task in sorted(total)}}


def _samples(template: ChatTemplate, problems: list[Problem], rollout: Rollout, breakdown, count: int
             ) -> list[dict[str, str]]:
    rows = []
    for i in range(min(count, len(breakdown.answers))):
        problem = problems[i // rollout.group_size]
        rows.append({"task": problem.task, "prompt": problem.prompt, "expected": problem.answer,
                     "thinking": breakdown.thinking[i], "answer": breakdown.answers[i],
                     "reward": f"{float(breakdown.reward[i]):.2f}"})
    return rows


def run_rl(model: torch.nn.Module, template: ChatTemplate, cfg: RLConfig, heldout_fraction: float, salt: str,
           log: Logger = lambda step, values: None) -> RLResult:
    """cfg.steps RL steps on `model` (float32, modified in place); held-out exact match before and after."""
    torch.manual_seed(cfg.seed)
    limit = model.config.max_seq_len - cfg.max_new_tokens  # rollouts do not slide the window

    def fits(problem: Problem) -> bool:
        return len(template.render_prompt([{"role": "user", "content": problem.prompt}])) <= limit

    train, heldout = split_problems(cfg, heldout_fraction, salt, fits)
    if len(train) < cfg.steps * cfg.prompts_per_step or not heldout:
        raise RLError(f"rl: too few task prompts fit the model's context of {model.config.max_seq_len} tokens with "
                      f"rl.max_new_tokens={cfg.max_new_tokens} ({len(train)} training, {len(heldout)} held-out); "
                      f"lower rl.max_new_tokens or choose shorter rl.tasks")
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    value_head = ValueHead(model.config.d_model) if cfg.algorithm == "ppo" else None
    params = list(model.parameters()) + (list(value_head.parameters()) if value_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    vocab_limit = getattr(template.tokenizer, "vocab_size", None)  # never sample the model's padding rows
    before = exact_match(model, template, heldout, cfg.max_new_tokens)
    evals, history, samples = [{"step": 0, **before}], [], []
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = [train[order[(step - 1) * cfg.prompts_per_step + i]] for i in range(cfg.prompts_per_step)]
        prompts = [template.render_prompt([{"role": "user", "content": p.prompt}]) for p in batch]
        seen: dict[str, Any] = {}

        def reward_fn(rollout: Rollout, batch=batch, seen=seen) -> torch.Tensor:
            seen["rollout"], seen["breakdown"] = rollout, task_rewards(template.tokenizer, batch, rollout,
                                                                       cfg.format_weight)
            return seen["breakdown"].reward

        stats = rl_step(model, optimizer, prompts, reward_fn, cfg, template.stop_ids, value_head=value_head,
                        ref_model=ref_model, generator=generator, vocab_limit=vocab_limit)
        breakdown = seen["breakdown"]
        stats.update(correct=float(breakdown.correct.mean()), format_rate=float(breakdown.formatted.mean()))
        stats.setdefault("kl", 0.0)
        stats.setdefault("clip_fraction", 0.0)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evals.append({"step": step, **exact_match(model, template, heldout, cfg.max_new_tokens)})
            stats["heldout_exact_match"] = evals[-1]["exact_match"]
        history.append(stats)
        log(step, stats)
        if step == cfg.steps:
            samples = _samples(template, batch, seen["rollout"], breakdown, cfg.samples)
    seconds = time.perf_counter() - start
    after = exact_match(model, template, heldout, cfg.max_new_tokens)
    evals.append({"step": cfg.steps, **after})
    return RLResult(model, before, after, history, evals, samples, seconds)


def samples_markdown(samples: list[dict[str, str]]) -> str:
    lines = ["# RL samples (last step's completions)", ""]
    for row in samples:
        lines += [f"## {row['task']}: {row['prompt']}", "", f"- expected: `{row['expected']}`",
                  f"- thinking: `{row['thinking']}`", f"- answer: `{row['answer']}`", f"- reward: {row['reward']}", ""]
    return "\n".join(lines)
