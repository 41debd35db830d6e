"""RL with verifiable rewards (gpt/rl): the algebra of GRPO/PPO on hand-checkable cases, sampling log-probs ==
training log-probs, and tiny end-to-end runs on a toy task whose optimum is known."""

import copy
import time

import pytest
import torch

from gpt.config import ConfigError
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.rl.config import RLConfig
from gpt.rl.grpo import clipped_surrogate, group_advantages, grpo_loss, kl_k3
from gpt.rl.loop import rl_step
from gpt.rl.ppo import ValueHead, gae
from gpt.rl.rollout import policy_forward, sample_rollouts, task_rewards
from gpt.sft.tasks import Problem

STOP = 1
TARGET = 5


def tiny_model(seed: int = 0, vocab_size: int = 12) -> DecoderOnlyTransformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, dropout=0.0)
    return DecoderOnlyTransformer(config).float()


def test_group_advantages_sum_to_zero_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0, 0.5, 0.0, 0.0, 0.0, 1.0])
    for normalize_std in (False, True):
        adv = group_advantages(rewards, group_size=4, normalize_std=normalize_std)
        assert adv.view(3, 4).sum(dim=1).abs().max() < 1e-6
        assert adv[0] > 0 and adv[1] < 0  # better than the group → pushed up
    plain = group_advantages(rewards, 4, normalize_std=False)
    assert torch.allclose(plain[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_all_equal_rewards_give_exactly_zero_policy_gradient():
    model = tiny_model()
    cfg = RLConfig(group_size=4, max_new_tokens=5)
    rollout = sample_rollouts(model, [[0, 2], [0, 3, 4]], 4, 5, [STOP], generator=torch.Generator().manual_seed(0))
    advantages = group_advantages(torch.full((8,), 0.7), 4, cfg.normalize_std)
    logprobs, _, _ = policy_forward(model, rollout)
    loss, _ = grpo_loss(logprobs, rollout, advantages, cfg)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)
    # ... and unequal rewards do move the policy (the check above can fail)
    model.zero_grad()
    logprobs, _, _ = policy_forward(model, rollout)
    loss, _ = grpo_loss(logprobs, rollout, group_advantages(torch.arange(8.0), 4), cfg)
    loss.backward()
    assert any(bool((p.grad != 0).any()) for p in model.parameters() if p.grad is not None)


def test_clipped_objective_equals_unclipped_at_ratio_one_and_is_pessimistic_outside():
    eps = 0.2
    logp = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([0.8, -1.3])
    assert torch.equal(clipped_surrogate(logp, logp, adv, eps), adv)  # ratio 1 → r·A = A
    old = torch.log(torch.tensor(1.0))
    for ratio, a, expected in ((1.5, 1.0, 1.2), (0.5, -1.0, -0.8),  # clipped: the smaller objective wins
                               (0.5, 1.0, 0.5), (1.5, -1.0, -1.5), (1.1, 1.0, 1.1)):  # unclipped
        lp = torch.log(torch.tensor(ratio)).requires_grad_()
        obj = clipped_surrogate(lp, old, torch.tensor(a), eps)
        assert obj.item() == pytest.approx(expected, abs=1e-6)
        obj.backward()
        clipped = expected != pytest.approx(ratio * a)
        assert (lp.grad.item() == 0) == clipped  # no gradient through a clipped ratio


def test_sampled_logprobs_equal_training_forward_logprobs():
    model = tiny_model(1)
    for temperature in (1.0, 0.7):
        rollout = sample_rollouts(model, [[0, 2, 3, 4, 6], [0, 7], [0, 3, 3]], 3, 8, [STOP], temperature,
                                  torch.Generator().manual_seed(2))
        assert rollout.attention_mask[:, 0].eq(0).any()  # left padding exercised
        with torch.no_grad():
            logprobs, _, _ = policy_forward(model, rollout, temperature)
        mask = rollout.completion_mask.bool()
        assert (logprobs - rollout.logprobs)[mask].abs().max() <= 1e-5


def test_rollout_masks_stop_at_the_stop_token():
    model = tiny_model(2, vocab_size=4)  # 1 in 4 chance of the stop token each step: most rows stop early
    rollout = sample_rollouts(model, [[0]], 16, 12, [STOP], generator=torch.Generator().manual_seed(0))
    for ids, mask, stopped in zip(rollout.completion_ids, rollout.completion_mask, rollout.stopped):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n - 1] == STOP) == bool(stopped) and not (ids[: n - 1] == STOP).any()
    assert rollout.stopped.any()


def test_gae_matches_a_hand_computed_three_step_example():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 5.0]])  # the 4th position is padding: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.9·0.7 - 0.6 = 0.03; δ0 = 0.9·0.6 - 0.5 = 0.04
    a2 = 0.3
    a1 = 0.03 + gamma * lam * a2
    a0 = 0.04 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]]), atol=1e-6)


def test_kl_to_an_identical_reference_is_zero_and_positive_otherwise():
    model = tiny_model(3)
    rollout = sample_rollouts(model, [[0, 2]], 4, 6, [STOP], generator=torch.Generator().manual_seed(0))
    logprobs, _, _ = policy_forward(model, rollout)
    ref = copy.deepcopy(model)
    ref_logprobs, _, _ = policy_forward(ref, rollout)
    cfg = RLConfig(group_size=4, kl_coef=0.1)
    _, stats = grpo_loss(logprobs, rollout, torch.zeros(4), cfg, ref_logprobs.detach())
    assert stats["kl"] == 0.0
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other, _, _ = policy_forward(ref, rollout)
    assert bool((kl_k3(logprobs, other) >= 0).all())
    _, stats = grpo_loss(logprobs, rollout, torch.zeros(4), cfg, other.detach())
    assert stats["kl"] > 0


def test_task_rewards_score_correctness_and_format():
    class CharTokenizer:  # ids 2.. are characters; enough to decode completions
        chars = "0123456789 "

        def decode(self, ids):
            return "".join(self.chars[i - 2] for i in ids if i >= 2)

    model = tiny_model(4, vocab_size=13)
    rollout = sample_rollouts(model, [[0]], 3, 4, [STOP], generator=torch.Generator().manual_seed(0))
    rollout.input_ids[:, 1:] = torch.tensor([[2 + 4, 2 + 2, STOP, STOP], [2 + 4, 2 + 2, 2 + 2, 2 + 2],
                                             [2 + 7, STOP, STOP, STOP]])
    rollout.completion_mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    rollout.stopped = torch.tensor([True, False, True])
    problems = [Problem("add", "40,2", "What is 40 + 2?", "42")]
    rewards = task_rewards(CharTokenizer(), problems, rollout, format_weight=0.5)
    assert rewards.correct.tolist() == [1.0, 0.0, 0.0]
    assert rewards.formatted.tolist() == [1.0, 0.0, 1.0]
    assert rewards.reward.tolist() == [1.5, 0.0, 0.5]


def test_config_rejects_unknown_algorithm_and_bad_values():
    with pytest.raises(ConfigError, match="algorithm"):
        RLConfig(algorithm="dpo")
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(group_size=1)
    with pytest.raises(ConfigError, match="temperature"):
        RLConfig(temperature=0.0)


def first_token_reward(rollout):
    """Toy verifiable reward: 1 when the completion starts with TARGET."""
    return (rollout.completion_ids[:, 0] == TARGET).float()


def run_toy(algorithm: str, steps: int, seed: int = 0) -> tuple[list[float], float, float]:
    model = tiny_model(seed)
    cfg = RLConfig(algorithm=algorithm, group_size=16, max_new_tokens=3, lr=1.0e-2, updates_per_batch=2)
    value_head = ValueHead(model.config.d_model) if algorithm == "ppo" else None
    params = list(model.parameters()) + (list(value_head.parameters()) if value_head else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    prompts = [[0, 2], [0, 3, 4], [0, 6]]
    start = time.perf_counter()
    curve = [rl_step(model, optimizer, prompts, first_token_reward, cfg, [STOP], value_head=value_head,
                     generator=generator)["reward"] for _ in range(steps)]
    final = sample_rollouts(model, prompts, 64, 1, [STOP], generator=torch.Generator().manual_seed(123))
    return curve, float(first_token_reward(final).mean()), time.perf_counter() - start


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_toy_run_learns_to_emit_the_target_token_first(algorithm):
    curve, final, seconds = run_toy(algorithm, steps=60)
    print(f"{algorithm}: reward {curve[0]:.3f} → {curve[-1]:.3f} over {len(curve)} steps; "
          f"final sampled reward {final:.3f}; {seconds:.1f} s")
    assert curve[0] < 0.3  # ~1/12 by chance at the start
    assert final >= 0.9
