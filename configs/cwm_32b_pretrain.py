"""CWM 32B pre-training at 8192 context on a v5p-512 (256 chips).

Public facts of the release (../shared/spec/cwm.md sections 1 and 5): the architecture (`model.preset="cwm_32b"`:
64 layers, width 6144, 48 query / 8 KV heads, 17 global layers and 8192-token windows, vocab 128256), and that
pre-training saw 8T tokens at 8192 context on a code-heavy general corpus. Everything else is chosen here: the
release publishes no optimizer, schedule, batch or hardware.

Chosen here, and why:
- batch: 512 rows x 8192 = 4.19M tokens per step (the size Llama-class models of this scale use), so 8T tokens are
  `steps` = 1,907,349 steps. cwm-plan's roofline (10 s per step, 75% MFU with the remat recompute) makes that 220
  days on one v5p-512, and a realistic 40-50% MFU over a year; more slices (mesh.data) shorten it.
- mesh: pure FSDP over the 256 chips (fsdp=256): each chip holds 1/256 of the float32 weights and Adam state (1.4 GiB)
  and two rows. At 8192 tokens FSDP's weight gathers hide behind compute (cwm-plan), and tensor parallelism would add
  exposed activation all-reduces.
- attention_impl "splash": JAX's TPU kernel, tuned on TPUs; ours ("pallas") is verified here only by interpret
  mode and Mosaic compilation (README, "Attention kernels").
- remat "full": with two 8192-token rows per chip, saving the projections ("dots") would take ~124 GiB per chip;
  recomputing the forward costs a third more FLOPs but fits in 95 GiB.
- optimizer: AdamW lr 3e-4 (peak), b1 0.9, b2 0.95, weight decay 0.1, clip 1.0, 2000 warmup steps, cosine to 10%:
  Llama 2 / 3 values for models of this size.

Data paths are placeholders for ArrayRecord shards written by `cwm-data build`, read through a gcsfuse mount
of the bucket (`/gcs/YOUR_BUCKET`, as MaxText's Grain pipeline does): Grain reads local paths.

    cwm-plan --config configs/cwm_32b_pretrain.py [--compile]
    python train.py --config configs/cwm_32b_pretrain.py --workdir gs://YOUR_BUCKET/runs/cwm_32b_pretrain
"""

import ml_collections

from cwm_jax.data import source_config
from cwm_jax.train.config import default_config

DATA = "/gcs/YOUR_BUCKET/pretrain"  # placeholder: your shards, through a gcsfuse mount of the bucket


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict(dict(preset="cwm_32b"))
    c.topology = "v5p-512"
    c.seq_len = 8192
    c.global_batch = 512
    c.microbatches = 1
    c.steps = 1_907_349  # 8e12 tokens / (512 x 8192)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    c.dtype = "bfloat16"
    c.attention_impl = "splash"  # the TPU default: README "Attention kernels" says why
    c.remat = "full"
    c.loss.chunk = 1024
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.decay = "cosine"
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.tokenizer = "/data/cwm/tokenizer.model"  # placeholder: the release's tiktoken ranks file
    # Placeholders: point them at your own tokenized or raw corpus (ArrayRecord of {"text": ...} records).
    c.data.sources = [
        source_config(name="code", kind="arrayrecord", path=f"{DATA}/code/*.array_record", weight=0.7),
        source_config(name="general", kind="arrayrecord", path=f"{DATA}/general/*.array_record", weight=0.3),
    ]
    c.data.num_workers = 8
    c.eval.every = 2000
    c.eval.data.sources = [source_config(name="code_eval", kind="arrayrecord", path=f"{DATA}/eval/*.array_record")]
    c.checkpoint.every = 1000
    c.checkpoint.keep = 3
    c.log_every = 10
    return c
