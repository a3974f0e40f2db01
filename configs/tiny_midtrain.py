"""Tiny mid-training on this CPU: the tiny_pretrain model continues on a mixture of code text, execution traces and
reasoning chats at a longer context, the shape of the release's mid-training stage at toy size.

Facts of the release (../shared/spec/cwm.md section 5; configs/cwm_32b_midtrain.py): mid-training runs at 131072
context, starts from the pre-trained weights, and mixes code world modeling data (Python execution traces, agentic
trajectories) with code, packed so that documents do not see each other. The mixture's kinds are the release's.

Chosen here, to run in seconds on 2 CPU cores: the tiny model of configs/tiny_pretrain.py; 1024 positions (4x
pre-training's; a toy trace is ~900 byte tokens at the median, so most fit a row whole, the rest continue in the next
row without their source); the token shares 0.5 code / 0.3 traces / 0.2 chats (the release's are not public); the
optimizer's numbers. The data is toy data every checkout has: the standard library's source as code, and the traces
and reasoning chats that configs/data/make_tiny_data.py wrote from the standard library (chats stand in for agentic
trajectories).

    python train.py --config configs/tiny_midtrain.py --workdir /tmp/tiny_midtrain [--config.init_from=MODEL_CKPT]
"""

from pathlib import Path

import ml_collections

from cwm_jax.data import source_config
from cwm_jax.train.config import load_config_file

DATA = Path(__file__).resolve().parent / "data"
# (name, kind, path, format, field, token share, mean length in byte tokens). The shares are chosen here (the
# release's mixture is not public); the lengths are measured: a standard library file is ~28000 byte tokens, a toy
# trace ~1070 and a toy chat ~370, so equal record weights would give ~98% code.
MIXTURE = [
    ("code", "stdlib", "*.py", "text", "text", 0.5, 28000),
    ("traces", "jsonl", str(DATA / "tiny_traces.jsonl"), "trace", "trace", 0.3, 1070),
    ("chat", "jsonl", str(DATA / "tiny_chat.jsonl"), "chat", "messages", 0.2, 370),
]


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(Path(__file__).resolve().with_name("tiny_pretrain.py"))
    # The pre-training stage's weights: its workdir (--config.init_from=runs/tiny) or a converted checkpoint whose
    # architecture matches the model block. The default "" starts from random weights, so the config runs on a fresh
    # checkout.
    c.init_from = ""
    c.seq_len = 1024
    # 4 x 1024 = 4096 tokens per step, 2x pre-training's 8 x 256 at a quarter of its rows; 4 rows still split over
    # fsdp=4 when 8 devices run sequence=2.
    c.global_batch = 4
    c.steps = 200
    # One CPU device: fsdp takes it and sequence stays 1. With 8 host devices
    # (XLA_FLAGS=--xla_force_host_platform_device_count=8), --config.mesh.sequence=2 runs context parallelism as the
    # 32B stage does (fsdp=4 x sequence=2; seq_len must divide by 2 x sequence).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    # Continuing pre-training: a third of its peak and a short re-warmup.
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 5
    # data.sources[*].weight mixes records, not tokens: weight = token share / mean document length.
    c.data.sources = [
        source_config(name=name, kind=kind, path=path, format=fmt, field=field, weight=share / length)
        for name, kind, path, fmt, field, share, length in MIXTURE
    ]
    c.checkpoint.every = 100
    c.log_every = 10
    return c
