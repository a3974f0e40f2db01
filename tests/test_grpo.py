"""GRPO: the loss and advantages against a direct numpy computation, the tiny model learning from rewards alone, and
exact resume (configs/tiny_rl.py: warm start on the answer format, then GRPO on "a+b=" tasks)."""

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cwm_jax.rl import grpo
from cwm_jax.train import loop
from cwm_jax.train.config import load_config_file

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_rl.py"


def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = grpo.group_advantages(rewards, 1e-6)
    # Group 0: mean 0.5, population std 0.5 -> +-1; group 1: all equal -> 0; group 2: mean 0.25, std sqrt(3)/4.
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_array_equal(adv[1], np.zeros(4))
    s = np.sqrt(3) / 4
    np.testing.assert_allclose(adv[2], [0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s], rtol=1e-5)


def test_token_loss_matches_numpy():
    rng = np.random.default_rng(0)
    B, T = 4, 7
    logp = rng.normal(-2, 0.5, (B, T))
    old = logp + rng.normal(0, 0.3, (B, T))  # ratios spread on both sides of the clip range
    ref = logp + rng.normal(0, 0.2, (B, T))
    adv = np.repeat(rng.normal(0, 1, (B, 1)), T, axis=1)
    mask = (rng.random((B, T)) > 0.3).astype(np.float64)
    got = grpo.grpo_token_loss(
        *(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)), clip_low=0.2, clip_high=0.28, kl_coef=0.1
    )
    # float64 reference, written out term by term.
    loss = kl_sum = clipped = ratio_sum = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            r = np.exp(logp[b, t] - old[b, t])
            a = adv[b, t]
            surrogate = min(r * a, min(max(r, 0.8), 1.28) * a)
            d = ref[b, t] - logp[b, t]
            kl = np.exp(d) - d - 1
            loss += -surrogate + 0.1 * kl
            kl_sum += kl
            clipped += float(min(max(r, 0.8), 1.28) * a < r * a)
            ratio_sum += r
    np.testing.assert_allclose([float(x) for x in got], [loss, kl_sum, clipped, ratio_sum], rtol=2e-5, atol=1e-5)
    assert 0 < clipped < mask.sum()  # the case exercises both branches of the clip


def test_token_logprobs_match_log_softmax():
    rng = np.random.default_rng(1)
    B, T, D, V = 2, 10, 8, 11
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    got = grpo.token_logprobs(h, w, targets, chunk=4)  # 10 positions in chunks of 4: padding exercised
    logits = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _config(**overrides):
    cfg = load_config_file(CONFIG)
    cfg.update_from_flattened_dict(overrides)  # dotted keys, as --config.a.b=v
    return cfg


def test_tiny_rl_reward_rises(tmp_path):
    """The whole configs/tiny_rl.py run (warm start, then GRPO), fixed seed: the mean reward rises clearly."""
    state = loop.train(_config(), tmp_path / "run")
    rewards = [h["reward"] for h in state["history"]]
    assert len(rewards) == load_config_file(CONFIG).steps
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    print(f"mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last > first + 0.15 and last > 1.5 * first, rewards
    assert all(h["groups_with_signal"] > 0 for h in state["history"][:5])  # the warm start gives GRPO a signal
    # staleness 0: the sampling policy is the learner's, so every token's ratio is 1 (per-token means) and none clips
    assert all(abs(h["ratio"] - 1.0) < 1e-3 and h["clip_frac"] == 0.0 for h in state["history"]), state["history"][0]


def test_resume_is_bit_identical(tmp_path):
    cfg = _config(**{"steps": 4, "rl.warmstart_steps": 5, "checkpoint.every": 2, "rl.staleness": 1, "rl.kl_coef": 0.05})
    straight = loop.train(copy.deepcopy(cfg), tmp_path / "a")
    loop.train(copy.deepcopy(cfg), tmp_path / "b", max_steps=2)  # stops after step 2 (a checkpoint)
    resumed = loop.train(copy.deepcopy(cfg), tmp_path / "b")
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["reward"] for h in straight["history"][2:]] == [h["reward"] for h in resumed["history"]]


def test_bad_rl_config(tmp_path):
    with pytest.raises(grpo.ConfigError, match="global_batch=8 must equal rl.prompts_per_step x"):
        loop.train(_config(global_batch=8), tmp_path / "c")
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    with pytest.raises(grpo.RLError, match="tasks.jsonl line 1: a task needs 'prompt' .* and 'kind'"):
        loop.train(_config(**{"rl.tasks": str(bad)}), tmp_path / "d")
