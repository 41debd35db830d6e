"""Reinforcement learning with verifiable rewards: the policy samples, a program checks, the policy moves.

Module map:
- `config.py`   `RLConfig`: one small typed config (algorithm grpo | ppo, group size, clipping, KL, GAE...).
- `rollout.py`  sampling groups of completions with the KV cache while recording each token's log-prob under the
                sampling policy (`sample_rollouts` → `Rollout`); the same log-probs recomputed by a training forward
                (`policy_forward`); rewards from the checkable SFT tasks (`task_rewards`).
- `grpo.py`     group-relative advantages, the clipped token-level policy-gradient loss, the k3 KL estimate and
                one GRPO update (`grpo_update`) — DeepSeekMath (Shao et al. 2024).
- `ppo.py`      the value head on the trunk's hidden states, GAE, clipped value loss and one PPO update
                (`ppo_update`) — Schulman et al. 2017; GAE: Schulman et al. 2016.
- `loop.py`     `rl_step`: sample → reward → update, dispatching on `RLConfig.algorithm`.
- `run.py`      `run_rl`: the `rl` stage's run (task prompts, held-out exact match before/after, samples).

The model stays plain: the value head and the RL losses are applied from outside through `model.hidden_states`
and `model.lm_head`. params.yaml `rl:` is `RLConfig`; stages/rl.py is the `rl` stage.
"""
