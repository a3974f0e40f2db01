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

import importlib.util
from pathlib import Path

import ml_collections

from cwm_jax.data import source_config

DATA = Path(__file__).resolve().parent / "data"


def _pretrain_config() -> ml_collections.ConfigDict:
    # Config files are loaded by path, not as a package, so the sibling is loaded by path too.
    spec = importlib.util.spec_from_file_location(
        "tiny_pretrain", Path(__file__).resolve().with_name("tiny_pretrain.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = _pretrain_config()
    # The mid-training stage's weights: a model checkpoint (cwm_jax.checkpoint format, as cwm-convert writes it) whose
    # config.json matches the model block. A tiny run's workdir holds training state, not that format, and no export
    # step exists yet, so the default "" starts from random weights and the config runs on a fresh checkout.
    c.init_from = ""
    c.seq_len = 512
    c.global_batch = 8
    c.steps = 100
    # Fine-tuning: a tenth of pre-training's peak, a short warmup (<= 5 so `--config.steps=5` smoke runs pass).
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
