"""Record formats -> token ids and a per-token train mask.

`encode_document` returns `{"ids": int32 [N], "train": float32 [N]}`; `train[i] = 1` when token i is trained on as the
target of token i - 1 (the packer turns it into `loss_mask` on inputs). Formats:

- "text": bos + text + eos, every token trained.
- "chat": a list of {"role", "content"} messages rendered with `cwm_jax.chat.render_chat` (no generation prompt);
  trained: the content of assistant turns and their closing <|eot_id|>. The "\\n\\n" that ends each header is prompt:
  `render_chat` encodes it with the content, so the tokens that encoding shares with "\\n\\n" alone are not trained.
- "trace": {"source", "entry", "frames": [{"event", "locals", "line", "value"}]} rendered as
  `render_trace_prompt(source, entry)` + `render_trace(frames)`; only the trace (ending <|end_of_text|>) is trained.
- "tokens": a list of token ids, every token trained.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cwm_jax import chat
from cwm_jax.data.config import DataError


def encode_document(where: str, record: dict, fmt: str, field: str, tokenizer) -> dict[str, np.ndarray]:
    """Token ids and train mask of `record[field]` in format `fmt`; DataError naming `where` for a bad record."""
    if field not in record:
        raise DataError(f"{where}: record has no field {field!r} (the source's field); its keys: {sorted(record)}")
    value = record[field]
    try:
        if fmt == "text":
            if not isinstance(value, str):
                raise DataError(f"field {field!r} must hold a string, found {type(value).__name__}")
            ids = tokenizer.encode(value, bos=True, eos=True)
            train = [1.0] * len(ids)
        elif fmt == "chat":
            ids, train = _chat(value, field, tokenizer)
        elif fmt == "trace":
            ids, train = _trace(value, field, tokenizer)
        elif fmt == "tokens":
            ids, train = _tokens(value, field, tokenizer), None
        else:
            raise DataError(f"unknown format {fmt!r}")
    except (ValueError, TypeError, KeyError) as e:  # DataError, and what the renderers and tokenizers raise
        raise DataError(f"{where}: cannot tokenize this {fmt!r} record: {e}") from None
    ids = np.asarray(ids, np.int32)
    train = np.ones(len(ids), np.float32) if train is None else np.asarray(train, np.float32)
    return {"ids": ids, "train": train}


def _chat(messages: Any, field: str, tokenizer) -> tuple[list[int], list[float]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"field {field!r} must hold a list of {{'role', 'content'}} messages")
    segments = chat.render_chat(messages, add_generation_prompt=False)
    header_ids = chat.encode_segments([chat.Segment("text", "\n\n")], tokenizer)
    ids: list[int] = []
    train: list[float] = []
    role, after_header = None, False
    for seg in segments:
        seg_ids = chat.encode_segments([seg], tokenizer)
        mask = [0.0] * len(seg_ids)
        if seg.kind == "special" and seg.text == chat.START_HEADER:
            role = None
        elif seg.kind == "text" and role is None:
            role = seg.text
        elif seg.kind == "special" and seg.text == chat.END_HEADER:
            after_header = True
            ids += seg_ids
            train += mask
            continue
        elif seg.kind == "text" and after_header and role == "assistant":
            # Tokens equal to the header's "\n\n" alone are prompt; from the first that differs on, content.
            shared = 0
            while shared < min(len(header_ids), len(seg_ids)) and seg_ids[shared] == header_ids[shared]:
                shared += 1
            mask = [0.0] * shared + [1.0] * (len(seg_ids) - shared)
        elif seg.kind == "special" and seg.text == chat.EOT and role == "assistant":
            mask = [1.0]
        after_header = False
        ids += seg_ids
        train += mask
    return ids, train


def _trace(value: Any, field: str, tokenizer) -> tuple[list[int], list[float]]:
    if not isinstance(value, dict) or not {"source", "entry", "frames"} <= set(value):
        raise DataError(f"field {field!r} must hold a trace record {{'source', 'entry', 'frames'}}")
    frames = []
    for i, f in enumerate(value["frames"]):
        if not isinstance(f, dict) or "event" not in f or "line" not in f:
            raise DataError(f"trace frame {i} must be a dict with 'event', 'line' (and 'locals' or 'value')")
        frames.append(chat.Frame(f["event"], f.get("locals"), f["line"], f.get("value")))
    prompt = chat.encode_segments(chat.render_trace_prompt(value["source"], value["entry"]), tokenizer)
    trace = chat.encode_segments(chat.render_trace(frames), tokenizer)
    return prompt + trace, [0.0] * len(prompt) + [1.0] * len(trace)


def _tokens(value: Any, field: str, tokenizer) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise DataError(f"field {field!r} must hold a list of integer token ids")
    bad = [t for t in value if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise DataError(f"token ids {bad[:5]} are outside the vocabulary 0..{tokenizer.vocab_size - 1}")
    return value
