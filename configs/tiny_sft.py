"""Tiny supervised fine-tuning on this CPU: reasoning chats with the loss on assistant tokens only, the shape of the
release's SFT stage at toy size.

Facts of the release (../shared/spec/cwm.md sections 4 and 5; configs/cwm_32b_sft.py): SFT follows mid-training and
trains reasoning and instruction following on chats in the reasoning format (`<think>` ... `</think>` then the
answer). The loss on assistant tokens only is this project's chat format (cwm_jax/data/formats.py).

Chosen here, to run in seconds on 2 CPU cores: the tiny model of configs/tiny_pretrain.py; 512 positions (the toy
chats are 300-630 byte tokens, median 350: all but 17 of 300 fit a row whole); the optimizer's numbers. The chats are
toy data from standard library docstrings (configs/data/make_tiny_data.py).

    python train.py --config configs/tiny_sft.py --workdir /tmp/tiny_sft [--config.init_from=MODEL_CKPT]
"""

from pathlib import Path

import ml_collections

from cwm_jax.data import source_config
from cwm_jax.train.config import load_config_file

DATA = Path(__file__).resolve().parent / "data"


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(Path(__file__).resolve().with_name("tiny_pretrain.py"))
    # The mid-training stage's weights: its workdir or a converted checkpoint whose architecture matches the model
    # block. The default "" starts from random weights, so the config runs on a fresh checkout.
    c.init_from = ""
    c.seq_len = 512
    c.global_batch = 8
    c.steps = 100
    # Fine-tuning: a tenth of pre-training's peak, a short warmup.
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 5
    c.data.sources = [
        source_config(name="chat", kind="jsonl", path=str(DATA / "tiny_chat.jsonl"), format="chat", field="messages")
    ]
    c.checkpoint.every = 50
    c.log_every = 10
    # No end-of-run sample: it encodes its prompt as plain text, so it cannot hold a chat prompt's special tokens.
    c.sample.max_new_tokens = 0
    return c
