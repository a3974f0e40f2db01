"""Training input pipelines: sources (JSONL, Parquet, ArrayRecord, TFDS, the standard library), record formats
(text, chat, trace, tokens), packing and per-process batches as a checkpointable grain iterator.

    it = make_iterator(data_cfg, tokenizer, seq_len=T, batch_size=B, seed=0)
    batch = next(it)  # inputs, targets, positions, segment_ids (int32 [B, T]), loss_mask (float32 [B, T])

The trainer checkpoints `it` with grain's Orbax handler: `grain.checkpoint.CheckpointSave(it)` and
`grain.checkpoint.CheckpointRestore(it)`.
"""

from cwm_jax.data.config import DataError, default_data_config, source_config
from cwm_jax.data.pipeline import make_iterator

__all__ = ["DataError", "default_data_config", "make_iterator", "source_config"]
