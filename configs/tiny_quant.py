"""Tiny pre-training for the quantization tests: a CWM-shaped model trained for about 40 s on 2 CPU cores.

`tests/conftest.py::trained_tiny_checkpoint` trains this config with `cwm_jax.train.loop.train` and exports it
(`cwm_jax.train.export`, as `cwm-convert train-to-orbax`) to a bfloat16 converted checkpoint, which
`tests/test_quant_quality.py` quantizes to int8 and int4 to compare next-token distributions on held-out text.
Nothing here is a fact of the release except the architecture's shape (local/global layers with the last global,
GQA, SwiGLU, llama3 RoPE): every number is this project's choice, picked for a model clearly past random (loss from
ln 512 = 6.2 to about 2.2 nats per byte) within the time a test may take.

    python train.py --config configs/tiny_quant.py --workdir /tmp/tiny_quant
"""

from pathlib import Path

from cwm_jax.data import source_config
from cwm_jax.train.config import load_config_file

# Top-level stdlib modules the model trains on; "[t-z]*.py" (textwrap, typing, uuid, ...) is the tests' held-out text.
TRAIN_FILES = "[a-s]*.py"


def get_config():
    # tiny_pretrain.py (byte tokenizer, stdlib text, float32 on CPU, lr 3e-3), narrowed and shortened.
    c = load_config_file(Path(__file__).with_name("tiny_pretrain.py"))
    # Width 64, MLP 192, 4 heads of 16: every linear layer's input width (64, 64, 192) is a multiple of 32, the int4
    # group size the tests use. Half the width of tiny_pretrain.py: over these 300 steps it learns as fast per step
    # (measured, 128-token rows: loss 2.2 at step 300 either way) in 60% of the time (40 s against 67 s).
    c.model.update(hidden_size=64, intermediate_size=192, head_dim=16)
    # 128-token rows: twice the steps of 256-token rows in the same time, which is what moves the loss early on.
    c.seq_len = 128
    c.steps = 300
    c.loss.chunk = 128
    c.optimizer.warmup_steps = 10
    c.data.sources = [source_config(name="stdlib", kind="stdlib", path=TRAIN_FILES, format="text")]
    c.checkpoint.every = c.steps  # one save, at the end, for the export
    c.checkpoint.async_save = False
    c.log_every = 1  # the per-step loss history shows the model trained
    c.tensorboard = False
    c.sample.max_new_tokens = 0
    return c
