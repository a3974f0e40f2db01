"""Tiny pre-training for the quantization tests: a CWM-shaped model trained for about 40 s on 2 CPU cores.

`tests/conftest.py::trained_tiny_checkpoint` trains this config with `cwm_jax.train.loop.train` and exports it
(`cwm_jax.train.export`, as `cwm-convert train-to-orbax`) to a bfloat16 converted checkpoint, which
`tests/test_quant_quality.py` quantizes to int8 and int4 to compare next-token distributions on held-out text.
Nothing here is a fact of the release except the architecture's shape (local/global layers with the last global,
GQA, SwiGLU, llama3 RoPE): every number is this project's choice, picked for a model clearly past random (loss from
ln 512 = 6.2 to about 2.2 nats per byte) within the time a test may take.

    python train.py --config configs/tiny_quant.py --workdir /tmp/tiny_quant
"""

import ml_collections

from cwm_jax.data import source_config
from cwm_jax.train.config import default_config

# Top-level stdlib modules the model trains on; "[t-z]*.py" (textwrap, typing, uuid, ...) is the tests' held-out text.
TRAIN_FILES = "[a-s]*.py"


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    # Width 64, MLP 192, 4 heads of 16: every linear layer's input width (64, 64, 192) is a multiple of 32, the int4
    # group size the tests use. Half the width of tiny_pretrain.py: over these 300 steps it learns as fast per step
    # (measured, 128-token rows: loss 2.2 at step 300 either way) in 60% of the time (40 s against 67 s).
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",
            num_layers=4,
            hidden_size=64,
            intermediate_size=192,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            sliding_window=64,
            bos_token_id=256,
            eos_token_ids=(257,),
            pad_token_id=260,
        )
    )
    # 128-token rows: twice the steps of 256-token rows in the same time, which is what moves the loss early on.
    c.seq_len = 128
    c.global_batch = 8
    c.steps = 300
    c.dtype = "float32"  # CPUs have no fast bf16 matmul
    c.remat = "none"
    c.loss.chunk = 128
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.01
    c.data.sources = [source_config(name="stdlib", kind="stdlib", path=TRAIN_FILES, format="text")]
    c.eval.every = 0
    c.checkpoint.every = c.steps  # one save, at the end, for the export
    c.checkpoint.async_save = False
    c.log_every = 1  # the per-step loss history shows the model trained
    c.tensorboard = False
    c.sample.max_new_tokens = 0
    return c
