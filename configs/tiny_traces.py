"""Tiny trace training: the tiny model learns CWM's execution-trace format from traces that `cwm-data traces` made.

The world-model part of the release's mid-training at toy size, on this CPU: the records are trace-prediction
prompts (the source with its entry marked) followed by the real trace, and only the trace is trained (format
"trace"). The argument after the colon is the traces' folder (ArrayRecord shards) or a .jsonl file; without it, the
committed configs/data/tiny_traces.jsonl (small programs traced by configs/data/make_tiny_data.py):

    cwm-data traces configs/data/trace_corpus.jsonl runs/traces
    python train.py --config configs/tiny_traces.py:runs/traces --workdir runs/tiny_traces
    cwm-convert train-to-orbax runs/tiny_traces runs/tiny_traces_ckpt
    cwm-eval trace --checkpoint runs/tiny_traces_ckpt --tasks configs/data/trace_corpus.jsonl --limit 20

Nothing here is a fact of the release beyond the trace format and the architecture's shape. Chosen here: the model of
tiny_quant.py (tiny_pretrain.py at width 64), 512-token rows (a trace of configs/data/trace_corpus.jsonl with its
prompt is 100 to 700 byte tokens), 8 rows per step (one per device when the tests run 8 host devices), 200 steps:
about two minutes on 2 cores, after which the model of `tests/conftest.py::trained_trace_model` predicts about half
the next lines of held-out calls right, where the untrained model predicts none (BENCHMARKS.md).
"""

from pathlib import Path

from cwm_jax.data import source_config
from cwm_jax.train.config import load_config_file

DEFAULT_TRACES = Path(__file__).resolve().parent / "data" / "tiny_traces.jsonl"


def get_config(traces: str = str(DEFAULT_TRACES)):
    c = load_config_file(Path(__file__).with_name("tiny_pretrain.py"))
    c.model.update(hidden_size=64, intermediate_size=192, head_dim=16)
    c.seq_len = 512
    c.global_batch = 8
    c.steps = 200
    c.loss.chunk = 256
    c.optimizer.warmup_steps = 10
    kind = "jsonl" if traces.endswith(".jsonl") else "arrayrecord"
    c.data.sources = [source_config(name="traces", kind=kind, path=traces, format="trace", field="trace")]
    c.checkpoint.every = c.steps  # one save, at the end, for the export
    c.checkpoint.async_save = False
    c.log_every = 10
    c.tensorboard = False
    c.sample.max_new_tokens = 0
    return c
