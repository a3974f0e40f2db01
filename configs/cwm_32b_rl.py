"""CWM 32B reinforcement learning with verifiable rewards (GRPO), on a v5p-512 (256 chips).

Public facts of the release (../shared/spec/cwm.md section 5): RL follows SFT; it is multi-task (software
engineering, competitive programming, agentic coding, math), multi-turn, verifiable (rewards from running code and
checking answers), GRPO-style and asynchronous; environment limits: context 131072 tokens, at most 65536 tokens per
action, 128 turns; tools bash / edit / create / submit. The release's evaluation sampling is temperature 1.0, top-p
0.95.

Chosen here, and why (no optimizer, group size, batch, clip range or hardware of the RL stage is public):
- single-turn tasks (code with unit tests, math with answers, `cwm_jax.rl.rewards`): multi-turn agentic episodes
  with tools are not built yet; the rows hold prompt + completion, so `seq_len` 32768 caps a completion at
  `rl.max_new_tokens` = 28672 (the release's 65536-token actions need the 131072 context of mid-training's mesh).
- group size 8 (`rl.samples_per_prompt`), 16 prompts per step: 128 rows x 32768 = 4.2M tokens per learner step,
  16384 tokens per chip with fsdp=32 x sequence=8 (mid-training's mesh layout on the same slice).
- rollouts and learner steps alternate on the same chips (`cwm_jax.rl.grpo`), with the behaviour policy refreshed every
  3 steps (`rl.staleness` = 2) to stand in for the release's asynchrony; a separate fleet of sampling hosts is future
  work. Sampling at temperature 1.0 with top-p 1.0, so that logp_old is the distribution actually sampled.
- clip range 0.2 / 0.28 (the asymmetric "clip-higher" of DAPO keeps exploration), no KL term (kl_coef 0: the clip
  bounds each update and the reference model would double the memory), token-level loss normalisation.
- optimizer: AdamW lr 1e-6 constant after 20 warmup steps, weight decay 0.0, clip 1.0: common RL fine-tuning values.
- reasoning prompts (`rl.reasoning`), format_weight 0.0: the answer is only credited when it parses, so the format is
  rewarded through correctness.

Data paths are placeholders (a JSONL of tasks on a gcsfuse mount).

    cwm-plan --config configs/cwm_32b_rl.py
    python train.py --config configs/cwm_32b_rl.py --workdir gs://YOUR_BUCKET/runs/cwm_32b_rl
"""

import ml_collections

from cwm_jax.rl.grpo import default_rl_config
from cwm_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict(dict(preset="cwm_32b"))
    c.init_from = "gs://YOUR_BUCKET/checkpoints/cwm-sft-orbax"  # placeholder: a converted SFT checkpoint
    c.topology = "v5p-512"
    c.rl = default_rl_config()
    c.rl.tasks = "/gcs/YOUR_BUCKET/rl/tasks.jsonl"
    c.rl.prompts_per_step = 16
    c.rl.samples_per_prompt = 8
    c.rl.max_new_tokens = 28672
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.reasoning = True
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.28
    c.rl.kl_coef = 0.0
    c.rl.staleness = 2
    c.global_batch = c.rl.prompts_per_step * c.rl.samples_per_prompt
    c.seq_len = 32768
    c.steps = 2000
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=8))
    c.dtype = "bfloat16"
    c.attention_impl = "splash"
    c.remat = "full"
    c.loss.chunk = 1024
    c.optimizer.lr = 1e-6
    c.optimizer.warmup_steps = 20
    c.optimizer.decay = "constant"
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0
    c.tokenizer = "/data/cwm/tokenizer.model"  # placeholder: the release's tiktoken ranks file
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    c.log_every = 1
    return c
