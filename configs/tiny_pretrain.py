"""Tiny pre-training on this CPU: a 4-layer CWM-shaped model learns Python from the standard library's own source.

Nothing here is a fact of the release except the architecture's shape (local/global pattern with the last layer
global, GQA, SwiGLU, llama3 RoPE): widths, steps and the schedule are chosen so `make demo` shows the loss falling
within a few minutes on 2 CPU cores. The byte tokenizer (256 bytes + the 256 CWM specials = 512 ids) needs no
training and keeps the chat and trace special tokens.

    python train.py --config configs/tiny_pretrain.py --workdir /tmp/tiny
"""

import ml_collections

from cwm_jax.data import source_config
from cwm_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    # cwm_tiny at 4 layers (global layers 0 and 3); ids of the byte tokenizer's <|begin_of_text|> / <|end_of_text|>.
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",
            num_layers=4,
            hidden_size=128,
            intermediate_size=384,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            sliding_window=64,
            bos_token_id=256,
            eos_token_ids=(257,),
            pad_token_id=260,
        )
    )
    c.seq_len = 256
    c.global_batch = 8
    c.steps = 600
    c.dtype = "float32"  # CPUs have no fast bf16 matmul; TPU configs compute in bfloat16
    c.remat = "none"
    c.loss.chunk = 256
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.data.sources = [source_config(name="stdlib", kind="stdlib", path="*.py", format="text")]
    c.eval.every = 0
    c.checkpoint.every = 100
    c.log_every = 20
    c.sample.prompt = "def "
    c.sample.max_new_tokens = 120
    return c
