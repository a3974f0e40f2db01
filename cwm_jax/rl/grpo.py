"""GRPO: reinforcement learning with verifiable rewards (`python train.py --config configs/tiny_rl.py`).

Each step:
1. Rollouts. P tasks (`rl.prompts_per_step`, drawn from the tasks file by a seeded order) are rendered as chat prompts
   and the behaviour policy samples G completions of each (`rl.samples_per_prompt`; `cwm_jax.generate.generate` with
   `samples_per_prompt=G`: each prompt is prefilled once and its KV cache shared by its G samples).
2. Rewards. Each completion is scored by `cwm_jax.rl.rewards.score` (unit tests in the sandbox for code, normalised
   answers for math, exact text for toy tasks; optionally a format term).
3. Advantages. Group-normalised: A = (r - mean of its group) / (std of its group + eps). A group whose rewards are
   all equal gets A = 0 and teaches nothing, which is why a policy that never succeeds (random weights) cannot learn:
   `rl.warmstart_steps` first trains the run's `data` (supervised, e.g. the answer format) when a run starts fresh.
4. Learner step. The clipped importance-ratio loss on completion tokens only:
   per token  -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL,  rho = exp(logp - logp_old),
   KL the k3 estimator exp(ref - logp) - (ref - logp) - 1 against the reference policy (the starting weights) when
   `rl.kl_coef` > 0; summed over completion tokens and divided by the completion tokens of the whole batch (token-
   level normalisation: long completions are not down-weighted per token, as in DAPO; the original GRPO averages per
   sequence first). Optimizer, clipping, microbatches, shardings and non-finite skipping are the training loop's
   (`cwm_jax.train.step.Trainer`).

Staleness: the release's RL was asynchronous (actors sample with weights a few updates old). Here the behaviour
policy is refreshed from the learner every `rl.staleness + 1` steps, so rollouts are up to `rl.staleness` updates
stale and the importance ratio corrects for it; logp_old is computed with the behaviour weights that sampled. This
runs in one program (rollouts and learner steps alternate on the same devices), deterministically: the state (step,
parameters, optimizer, behaviour and reference weights) is checkpointed with Orbax, every sample's randomness comes
from (seed, step), and a resumed run continues bit-identically.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cwm_jax import chat, hf, sharding
from cwm_jax.config import ConfigError
from cwm_jax.data.config import DataError
from cwm_jax.data.sources import iter_json_records
from cwm_jax.generate import generate, until_stop
from cwm_jax.rl import rewards
from cwm_jax.tokenizer import load_tokenizer
from cwm_jax.train.config import validate
from cwm_jax.train.step import BATCH_KEYS, Trainer, strided_chunks, unstrided

log = logging.getLogger("cwm_jax.rl")

RL_KEYS = ("advantages", "old_logp", "ref_logp")


def default_rl_config() -> ml_collections.ConfigDict:
    """The `rl` block of a GRPO run config (see the module docstring; the 32B config says which are the release's)."""
    return ml_collections.ConfigDict(
        dict(
            tasks="",  # JSONL of tasks: {"task_id", "prompt" or "messages", "kind", "answer" or "tests"}
            prompts_per_step=8,
            samples_per_prompt=8,
            max_new_tokens=256,
            temperature=1.0,
            top_p=1.0,  # sampling from the full policy: the ratio's logp_old is the sampled distribution's
            reasoning=False,  # prompts in the reasoning format (system prompt, "<think>\n" after the header)
            clip_low=0.2,
            clip_high=0.2,
            kl_coef=0.0,
            adv_eps=1e-6,
            format_weight=0.0,
            staleness=0,
            warmstart_steps=0,  # supervised steps on `data` before RL when a run starts fresh
            warmstart_lr=3e-3,
        )
    )


class RLError(ConfigError):
    """A bad tasks file or rl block."""


def load_tasks(path) -> list[dict]:
    """Tasks of a JSONL file; each needs "prompt" (a user message) or "messages", and what `rewards.score` needs
    ("kind" plus "answer" or "tests"). Raises RLError naming the file and line."""
    tasks = []
    try:
        for _, where, task in iter_json_records(path):
            if not ({"prompt", "messages"} & set(task)) or "kind" not in task:
                raise RLError(f"{where}: a task needs 'prompt' (or 'messages') and 'kind'")
            tasks.append(task)
    except OSError as e:
        raise RLError(f"rl.tasks: cannot read {path} ({e})") from None
    except DataError as e:
        raise RLError(str(e)) from None
    if not tasks:
        raise RLError(f"rl.tasks: {path} holds no task")
    return tasks


def task_messages(task: dict) -> list[dict]:
    return task["messages"] if "messages" in task else [{"role": "user", "content": task["prompt"]}]


def token_logprobs(h_BTD, w_DV, targets_BT, chunk: int):
    """log p(target) [B, T] in float32 from final hidden states, [B, c, V] logits at a time (the strided chunks of
    `cwm_jax.train.step.chunked_cross_entropy`)."""
    B, T, D = h_BTD.shape
    h_nBcD, t_nBc = strided_chunks(chunk, h_BTD, targets_BT)
    w_DV = w_DV.astype(h_BTD.dtype)

    @jax.checkpoint
    def body(_, xs):
        h_BcD, t_Bc = xs
        logits_BcV = jnp.dot(h_BcD.reshape(-1, D), w_DV, preferred_element_type=jnp.float32)
        logits_BcV = logits_BcV.reshape(B, -1, w_DV.shape[1])
        logits_BcV = sharding.constrain(logits_BcV, ("act_batch", None, "act_vocab"))
        target_Bc = jnp.sum(logits_BcV * jax.nn.one_hot(t_Bc, logits_BcV.shape[-1], dtype=jnp.float32), axis=-1)
        return None, target_Bc - jax.nn.logsumexp(logits_BcV, axis=-1)

    _, logp_nBc = jax.lax.scan(body, None, (h_nBcD, t_nBc))
    return unstrided(logp_nBc, T)


def grpo_token_loss(logp_BT, old_BT, ref_BT, adv_BT, mask_BT, *, clip_low, clip_high, kl_coef):
    """(summed loss, summed KL, clipped tokens, summed ratio) over the masked tokens (see the module docstring)."""
    ratio = jnp.exp(logp_BT - old_BT)
    unclipped = ratio * adv_BT
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv_BT
    pg = -jnp.minimum(unclipped, clipped)
    d = ref_BT - logp_BT
    kl = jnp.exp(d) - d - 1.0
    m = mask_BT.astype(jnp.float32)
    per_token = pg + kl_coef * kl if kl_coef else pg
    return (
        jnp.sum(per_token * m),
        jnp.sum(kl * m),
        jnp.sum((clipped < unclipped).astype(jnp.float32) * m),
        jnp.sum(ratio * m),
    )


def score_completions(texts: list[str], tasks: list[dict], rl) -> list[dict]:
    """`rewards.score` of each completion text on its task, in parallel threads (code tasks run in sandboxes)."""
    score = functools.partial(rewards.score, format_weight=float(rl.format_weight), reasoning=bool(rl.reasoning))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(score, texts, tasks))


def group_advantages(rewards_PG: np.ndarray, eps: float) -> np.ndarray:
    """(r - group mean) / (group std + eps) per row of [P, G] rewards (population std, as GRPO)."""
    r = np.asarray(rewards_PG, np.float64)
    return ((r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + eps)).astype(np.float32)


class GrpoTrainer(Trainer):
    """The training loop's Trainer with the GRPO loss: batches carry advantages and the behaviour / reference
    policies' token log-probabilities beside the usual rows."""

    batch_keys = BATCH_KEYS + RL_KEYS
    float_keys = ("loss_mask", *RL_KEYS)

    def __post_init__(self):
        super().__post_init__()
        shardings = {k: self.batch_sharding for k in self.batch_keys}
        self._logprobs = jax.jit(
            self._logprobs_fn, in_shardings=(self.param_shardings, shardings), out_shardings=self.batch_sharding
        )

    def _logprobs_fn(self, params, batch):
        model = hf.model_from_params(self.model_config, params, **self.model_kwargs)
        h_BTD = model(batch["inputs"], batch["positions"], batch["segment_ids"], return_hidden=True)
        return token_logprobs(h_BTD, params["lm_head"], batch["targets"], self.cfg.loss.chunk)

    def logprobs(self, params, batch):
        """log p(target) [B, T] of `params` on a global batch."""
        with jax.set_mesh(self.mesh):
            return self._logprobs(params, batch)

    def _loss(self, params, batch, total):
        rl = self.cfg.rl
        logp = self._logprobs_fn(params, batch)
        loss, kl, clipped, ratio = grpo_token_loss(
            logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
            clip_low=float(rl.clip_low), clip_high=float(rl.clip_high), kl_coef=float(rl.kl_coef),
        )  # fmt: skip
        return loss / total, dict(kl=kl, clip_frac=clipped, ratio=ratio)


def _rows(prompts: list[list[int]], completions: list[list[int]], G: int, T: int) -> dict:
    """Rows of (prompt + completion) [P * G, T]: inputs / targets shifted by one, loss on completion targets."""
    B = len(completions)
    rows = {k: np.zeros((B, T), np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
    for b, completion in enumerate(completions):
        ids = prompts[b // G] + completion
        n = len(ids) - 1
        rows["inputs"][b, :n] = ids[:-1]
        rows["targets"][b, :n] = ids[1:]
        rows["positions"][b, :n] = np.arange(n)
        rows["segment_ids"][b, :n] = 1
        rows["loss_mask"][b, len(prompts[b // G]) - 1 : n] = 1.0
    return rows


def _check(cfg, tasks, prompts) -> None:
    rl = cfg.rl
    P, G = int(rl.prompts_per_step), int(rl.samples_per_prompt)
    if P < 1 or G < 2:
        raise ConfigError(f"rl.prompts_per_step must be >= 1 and rl.samples_per_prompt >= 2, found {P} and {G}")
    if cfg.global_batch != P * G:
        raise ConfigError(
            f"global_batch={cfg.global_batch} must equal rl.prompts_per_step x rl.samples_per_prompt = {P * G}"
        )
    if P > len(tasks):
        raise ConfigError(f"rl.prompts_per_step={P} exceeds the {len(tasks)} tasks of {rl.tasks}")
    longest = max(len(p) for p in prompts)
    if longest + int(rl.max_new_tokens) - 1 > cfg.seq_len:
        raise ConfigError(
            f"seq_len={cfg.seq_len} cannot hold the longest prompt ({longest} tokens) plus rl.max_new_tokens="
            f"{rl.max_new_tokens}; raise seq_len or lower rl.max_new_tokens"
        )


def _warmstart(cfg, model_config, mesh, params):
    """`rl.warmstart_steps` supervised steps on the run's `data` (from `params`, or random weights when None)."""
    from cwm_jax.data import make_iterator

    sft = copy.deepcopy(cfg)
    with sft.unlocked():
        sft.steps = int(cfg.rl.warmstart_steps)
        sft.optimizer.lr = float(cfg.rl.warmstart_lr)
        sft.optimizer.warmup_steps = min(int(cfg.optimizer.warmup_steps), sft.steps - 1)
    trainer = Trainer(sft, model_config, mesh)
    it = make_iterator(
        sft.data, load_tokenizer(cfg.tokenizer), seq_len=sft.seq_len, batch_size=sft.global_batch, seed=cfg.seed,
        rows=trainer.local_rows(),
    )  # fmt: skip
    state = trainer.init_state(params)
    for _ in range(sft.steps):
        state, metrics = trainer.step(state, trainer.global_batch(next(it)))
    log.info("warm start: %d supervised steps, last loss %.4f", sft.steps, float(metrics["loss"]))
    return state["params"]


def train_grpo(cfg, workdir, *, max_steps: int | None = None) -> dict:
    """Run (or resume) GRPO as `cfg.rl` describes, in `workdir`; returns the final state with its "history"."""
    from cwm_jax.train.loop import TrainingError, _initial_params, _Metrics, append_history

    workdir = epath.Path(workdir)
    if "://" not in str(workdir):
        workdir = workdir.absolute()
    model_config, mesh_sizes = validate(cfg, jax.device_count())
    rl = cfg.rl
    tokenizer = load_tokenizer(cfg.tokenizer)
    tasks = load_tasks(rl.tasks)
    prompts = [
        chat.encode_segments(chat.render_chat(task_messages(t), reasoning=bool(rl.reasoning)), tokenizer) for t in tasks
    ]
    _check(cfg, tasks, prompts)
    P, G = int(rl.prompts_per_step), int(rl.samples_per_prompt)
    mesh = sharding.make_mesh(**mesh_sizes)
    trainer = GrpoTrainer(cfg, model_config, mesh)
    abstract = dict(state=trainer.abstract_state(), policy=trainer.abstract_state()["params"])
    if rl.kl_coef:
        abstract["ref"] = abstract["policy"]
    workdir.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(cfg.checkpoint.every), 1), max_to_keep=int(cfg.checkpoint.keep), create=True,
        enable_async_checkpointing=False,  # the behaviour weights are read again right after a save
    )  # fmt: skip
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    latest = manager.latest_step()
    if latest is not None:
        try:
            run = manager.restore(latest, args=ocp.args.Composite(run=ocp.args.StandardRestore(abstract))).run
        except (ValueError, KeyError) as e:
            raise TrainingError(
                f"checkpoint step {latest} in {manager.directory} does not fit this config ({e}); use another "
                "--workdir, or the config it was written with"
            ) from None
        log.info("resumed from %s step %d", manager.directory, latest)
    else:
        params = _initial_params(cfg, trainer) if cfg.init_from else None
        if int(rl.warmstart_steps) > 0:
            params = _warmstart(cfg, model_config, mesh, params)
        state = trainer.init_state(params)
        run = dict(state=state, policy=jax.tree.map(jnp.copy, state["params"]))
        if rl.kl_coef:
            run["ref"] = jax.tree.map(jnp.copy, state["params"])
    stop_ids = frozenset(model_config.eos_token_ids) | frozenset(tokenizer.stop_ids)
    metrics_out = _Metrics(workdir, cfg.tensorboard)
    start = int(run["state"]["step"])
    end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    history = []
    for step in range(start, end):
        t0 = time.perf_counter()
        if step % (int(rl.staleness) + 1) == 0:
            run["policy"] = jax.tree.map(jnp.copy, run["state"]["params"])
        rng = np.random.default_rng([int(cfg.seed), step])
        chosen = rng.choice(len(tasks), size=P, replace=False)
        step_prompts = [prompts[i] for i in chosen]
        with jax.set_mesh(mesh):
            completions = generate(
                trainer.model(run["policy"]), step_prompts, int(rl.max_new_tokens), temperature=float(rl.temperature),
                top_p=float(rl.top_p) if rl.top_p < 1 else None, seed=int(cfg.seed) * 1_000_003 + step,
                stop_ids=stop_ids, samples_per_prompt=G,
            )  # fmt: skip
        t_gen = time.perf_counter() - t0
        texts = [tokenizer.decode(until_stop(c, stop_ids)) for c in completions]
        scores = score_completions(texts, [tasks[chosen[b // G]] for b in range(P * G)], rl)
        reward_PG = np.array([s["reward"] for s in scores], np.float32).reshape(P, G)
        adv_PG = group_advantages(reward_PG, float(rl.adv_eps))
        local = _rows(step_prompts, completions, G, cfg.seq_len)
        local["advantages"] = np.repeat(adv_PG.reshape(-1, 1), cfg.seq_len, axis=1).astype(np.float32)
        rows = trainer.local_rows()
        local = {k: v[rows] for k, v in local.items()}
        zeros = np.zeros((len(rows), cfg.seq_len), np.float32)
        batch = trainer.global_batch({**local, "old_logp": zeros, "ref_logp": zeros})
        batch["old_logp"] = trainer.logprobs(run["policy"], batch)
        batch["ref_logp"] = trainer.logprobs(run["ref"], batch) if rl.kl_coef else batch["old_logp"]
        run["state"], metrics = trainer.step(run["state"], batch)
        done = step + 1
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # kl, clip_frac and ratio arrive per completion token (the Trainer divides its sums by the loss tokens).
        m.update(
            reward=float(reward_PG.mean()), correct=float(np.mean([s["correct"] for s in scores])),
            format=float(np.mean([s["format"] for s in scores])),
            groups_with_signal=float(np.mean(reward_PG.std(axis=1) > 0)),
            completion_tokens=float(np.mean([len(c) for c in completions])),
            rollout_s=t_gen, step_s=time.perf_counter() - t0,
        )  # fmt: skip
        history.append({"step": done, **m})
        metrics_out.write(done, m)
        if done % cfg.log_every == 0 or done == end:
            log.info(
                "step %d/%d reward %.3f correct %.3f format %.3f signal %.2f loss %.4f kl %.4f clip %.3f "
                "len %.1f rollout %.1fs step %.1fs",
                done, cfg.steps, m["reward"], m["correct"], m["format"], m["groups_with_signal"], m["loss"], m["kl"],
                m["clip_frac"], m["completion_tokens"], m["rollout_s"], m["step_s"],
            )  # fmt: skip
        if cfg.checkpoint.every and (done % cfg.checkpoint.every == 0 or done == cfg.steps):
            manager.save(done, args=ocp.args.Composite(run=ocp.args.StandardSave(run)), force=done == cfg.steps)
    manager.wait_until_finished()
    manager.close()
    metrics_out.close()
    append_history(workdir, history)
    state = run["state"]
    state["history"] = history
    return state
