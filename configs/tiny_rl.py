"""Tiny GRPO on this CPU: the tiny model gets better at adding two small numbers from a verifiable reward alone.

`python train.py --config configs/tiny_rl.py --workdir runs/tiny_rl` runs it from a fresh checkout: a supervised warm
start (`rl.warmstart_steps` on `data`: chats "a+b=" whose reply is the sum a third of the time and a random digit
otherwise, so the model learns the answer format and is right about a third of the time when sampled), then GRPO on
the 25 tasks of configs/data/tiny_rl_tasks.jsonl ("3+4=" -> "7", exact-match reward, no labels). From random
weights every reward would be 0, every group's advantages 0, and nothing could learn.

Nothing here is a fact of the release (configs/cwm_32b_rl.py lists those): the task, sizes and rates are chosen so
`tests/test_grpo.py` sees the mean reward rise clearly (about 0.35 to 0.65 over the 60 steps, BENCHMARKS.md) in
about 90 s on 2 cores. 8 prompts x 8 samples = 64 rows of 64 tokens per step (a prompt is 27 byte tokens, a
completion at most 4). The learning rate is low for Adam on a model this small: a group whose rewards are all equal
gives no gradient, and Adam scales the remaining small gradients up to full-size steps, so 3e-3 made the policy
collapse onto one answer (measured).
"""

from pathlib import Path

from cwm_jax.data import source_config
from cwm_jax.rl.grpo import default_rl_config
from cwm_jax.train.config import load_config_file

DATA = Path(__file__).resolve().parent / "data"


def get_config():
    c = load_config_file(Path(__file__).with_name("tiny_pretrain.py"))
    c.model.update(hidden_size=64, intermediate_size=192, head_dim=16)
    c.rl = default_rl_config()
    c.rl.tasks = str(DATA / "tiny_rl_tasks.jsonl")
    c.rl.prompts_per_step = 8
    c.rl.samples_per_prompt = 8
    c.rl.max_new_tokens = 4
    c.rl.warmstart_steps = 200
    c.rl.warmstart_lr = 3e-3
    c.global_batch = c.rl.prompts_per_step * c.rl.samples_per_prompt
    c.seq_len = 64
    c.steps = 60
    c.loss.chunk = 64
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    # The warm start's supervised data: the tasks' prompts, a third answered right (make_tiny_data.py).
    c.data.sources = [
        source_config(
            name="format", kind="jsonl", path=str(DATA / "tiny_rl_warmstart.jsonl"), format="chat", field="messages"
        )
    ]
    c.checkpoint.every = 20
    c.log_every = 5
    c.tensorboard = False
    c.sample.max_new_tokens = 0
    return c
