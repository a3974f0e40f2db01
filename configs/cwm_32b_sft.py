"""CWM 32B supervised fine-tuning: chat with reasoning, loss on assistant tokens only, on a v5p-256 (128 chips).

Public facts of the release (../shared/spec/cwm.md sections 1 and 5): the architecture (`model.preset="cwm_32b"`),
and that SFT trained reasoning and instruction following on about 100B tokens after mid-training. Everything else
is chosen here: no optimizer, schedule, batch, context length or hardware of the SFT stage is public.

Chosen here, and why:
- init_from: a converted mid-trained checkpoint (a run of configs/cwm_32b_midtrain.py, or the release's
  `facebook/cwm-pretrain` through `cwm-convert hf-to-orbax`); the path is a placeholder.
- data: chat records (`format="chat"`: a list of {"role", "content"} messages, assistant turns may carry reasoning);
  the chat format puts the loss on assistant tokens only. Placeholder paths.
- context: 32768 tokens per row, enough for most reasoning chats; longer records are cut (an agentic SFT mix needs
  the mid-training context, 131072, and that config's mesh).
- batch: 64 rows x 32768 = 2.1M tokens per step, half the pre-training batch (fine-tuning data is smaller and
  steps count more); 100B tokens are `steps` = 47,684 steps.
- mesh and slice: a v5p-256 is enough for 100B tokens (about a week at the roofline rate); fsdp=32 x sequence=4,
  two rows per chip of 8192 positions each. The axes must be products of the 4x4x8 torus's sides (jax.make_mesh):
  sequence=2 is not.
- attention_impl "splash": JAX's TPU kernel, tuned on TPUs; ours ("pallas") is verified here only by interpret
  mode and Mosaic compilation (README, "Attention kernels").
- remat "full": at 16384 positions per chip only the layer inputs can be kept.
- optimizer: AdamW lr 1e-5 (peak), 500 warmup steps, cosine to 10%, weight decay 0.1, clip 1.0: common SFT values
  for a model of this size.

Data paths are placeholders for ArrayRecord shards written by `cwm-data build`, read through a gcsfuse mount
of the bucket (`/gcs/YOUR_BUCKET`, as MaxText's Grain pipeline does): Grain reads local paths.

    cwm-plan --config configs/cwm_32b_sft.py [--compile]
    python train.py --config configs/cwm_32b_sft.py --workdir gs://YOUR_BUCKET/runs/cwm_32b_sft
"""

import ml_collections

from cwm_jax.data import source_config
from cwm_jax.train.config import default_config


def _chat(name, path, weight):
    return source_config(name=name, kind="arrayrecord", path=path, format="chat", field="messages", weight=weight)


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict(dict(preset="cwm_32b"))
    c.init_from = "gs://YOUR_BUCKET/checkpoints/cwm-midtrain-orbax"
    c.topology = "v5p-256"
    c.seq_len = 32768
    c.global_batch = 64
    c.microbatches = 1
    c.steps = 47_684  # 1e11 tokens / (64 x 32768)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=4))
    c.dtype = "bfloat16"
    c.attention_impl = "splash"  # the TPU default: README "Attention kernels" says why
    c.remat = "full"
    c.loss.chunk = 1024
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.decay = "cosine"
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.tokenizer = "/data/cwm/tokenizer.model"  # placeholder: the release's tiktoken ranks file
    c.data.sources = [
        _chat("reasoning", "/gcs/YOUR_BUCKET/sft/reasoning/*.array_record", 0.6),
        _chat("instructions", "/gcs/YOUR_BUCKET/sft/instructions/*.array_record", 0.4),
    ]
    c.data.num_workers = 8
    c.eval.every = 500
    c.eval.data.sources = [_chat("sft_eval", "/gcs/YOUR_BUCKET/sft/eval/*.array_record", 1.0)]
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.log_every = 10
    return c
