"""CWM 32B mid-training at 131072 context on a v5p-512 (256 chips), with context parallelism.

Public facts of the release (../shared/spec/cwm.md sections 1 and 5): the architecture (`model.preset="cwm_32b"`),
and that mid-training continued pre-training for 5T more tokens at 131072 context on code world modeling data:
Python memory traces of programs run in containers (>200M), agentic trajectories of ForagerAgent (3M), PR-derived
data and executable repository images, with document-causal masking (packed documents do not see each other, which
`segment_ids` give here). Everything else is chosen here: no optimizer, schedule, batch, mixture weights or hardware
is public.

Chosen here, and why:
- init_from: a converted checkpoint of the stage before. The release ships its own pre-trained weights as
  `facebook/cwm-pretrain` (converted with `cwm-convert hf-to-orbax`); a run of configs/cwm_32b_pretrain.py gives its
  own. The placeholder path must be replaced, or set to "" to start from random weights.
- batch: 32 rows x 131072 = 4.19M tokens per step, the pre-training stage's token count per step, so the two
  schedules compare; 5T tokens are `steps` = 1,192,093 steps.
- mesh: sequence=8 (context parallelism: each chip holds 16384 positions of a row) x fsdp=32; one row per fsdp
  group. Tensor parallelism is not needed: FSDP holds the weights and the sequence axis splits the activations.
- attention_impl "splash": JAX's TPU kernel, tuned on TPUs; ours ("pallas") is verified here only by interpret
  mode and Mosaic compilation (README, "Attention kernels").
- remat "full": at 16384 positions per chip only the layer inputs can be kept.
- optimizer: AdamW continuing pre-training at a lower peak (1e-4) with a short re-warmup (1000 steps) and cosine to
  10%, the usual way to extend context without forgetting; b2, weight decay and clipping as in pre-training.
- mixture: traces 0.4, agentic 0.3, code 0.3 (placeholders: point the paths at your own ArrayRecord shards).

Data paths are placeholders for ArrayRecord shards written by `cwm-data build`, read through a gcsfuse mount
of the bucket (`/gcs/YOUR_BUCKET`, as MaxText's Grain pipeline does): Grain reads local paths.

    cwm-plan --config configs/cwm_32b_midtrain.py [--compile]
    python train.py --config configs/cwm_32b_midtrain.py --workdir gs://YOUR_BUCKET/runs/cwm_32b_midtrain
"""

import ml_collections

from cwm_jax.data import source_config
from cwm_jax.train.config import default_config


def _source(name, path, format, field, weight):
    return source_config(name=name, kind="arrayrecord", path=path, format=format, field=field, weight=weight)


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict(dict(preset="cwm_32b"))
    c.init_from = "gs://YOUR_BUCKET/checkpoints/cwm-pretrain-orbax"  # cwm-convert hf-to-orbax of facebook/cwm-pretrain
    c.topology = "v5p-512"
    c.seq_len = 131072
    c.global_batch = 32
    c.microbatches = 1
    c.steps = 1_192_093  # 5e12 tokens / (32 x 131072)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=8))
    c.dtype = "bfloat16"
    c.attention_impl = "splash"  # the TPU default: README "Attention kernels" says why
    c.remat = "full"
    c.loss.chunk = 1024
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
    c.optimizer.decay = "cosine"
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.tokenizer = "/data/cwm/tokenizer.model"  # placeholder: the release's tiktoken ranks file
    c.data.sources = [
        # Execution traces (the release's Python memory traces) as trace records.
        _source("traces", "/gcs/YOUR_BUCKET/midtrain/traces/*.array_record", "trace", "trace", 0.4),
        # Agentic trajectories (ForagerAgent-style) as chat transcripts; the loss covers the agent's (assistant) turns.
        _source("agentic", "/gcs/YOUR_BUCKET/midtrain/agentic/*.array_record", "chat", "messages", 0.3),
        # Code and PR-derived text, continuing the pre-training distribution.
        _source("code", "/gcs/YOUR_BUCKET/midtrain/code/*.array_record", "text", "text", 0.3),
    ]
    c.data.num_workers = 8
    c.eval.every = 2000
    c.eval.data.sources = [
        _source("traces_eval", "/gcs/YOUR_BUCKET/midtrain/eval/*.array_record", "trace", "trace", 1.0)
    ]
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.log_every = 10
    return c
