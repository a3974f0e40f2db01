"""Text in, text out: a model and its tokenizer for raw completion, chat and trace prediction.

`Generator.from_checkpoint(dir)` loads a converted checkpoint and the tokenizer copied into it; `complete`, `chat` and
`predict_trace` render the prompt (`cwm_jax.chat`, spec section 4), run `cwm_jax.generate.generate` and decode and
parse the new tokens. Sampling defaults are the release's (spec section 4): temperature 1.0, top_p 0.95.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cwm_jax import checkpoint
from cwm_jax.chat import (
    EVENT_SEP,
    FRAME_SEP,
    Frame,
    Message,
    Reply,
    Segment,
    encode_segments,
    parse_reply,
    parse_trace,
    render_chat,
    render_trace,
    render_trace_prompt,
)
from cwm_jax.generate import generate, until_stop
from cwm_jax.model import CwmModel
from cwm_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer

# Release sampling defaults (spec section 4).
TEMPERATURE = 1.0
TOP_P = 0.95


class GeneratorError(ValueError):
    """A request the generator cannot serve (empty or too long prompt, bad sampling settings, mismatched files)."""


class Generator:
    """A CwmModel and the Tokenizer of its vocabulary.

    Raises GeneratorError if the tokenizer has more ids than the model's vocabulary (a checkpoint converted with a
    tokenizer of another model).
    """

    def __init__(self, model: CwmModel, tokenizer: Tokenizer):
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise GeneratorError(
                f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the model's vocab_size is {vocab}; "
                "use the tokenizer the checkpoint was trained with"
            )
        self.model = model
        self.tokenizer = tokenizer
        # Generation stops (inside the decode loop) on the config's eos ids and the tokenizer's stop ids alike.
        self._stop_ids = frozenset(model.config.eos_token_ids) | frozenset(tokenizer.stop_ids)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, *, mesh=None, dtype=None) -> Generator:
        """The model of a converted checkpoint (`checkpoint.load(ckpt_dir, mesh, dtype)`) and the tokenizer file
        copied into the same folder (`load_tokenizer(ckpt_dir)`). Raises CheckpointError for a folder that is not a
        converted checkpoint and GeneratorError when it holds no readable tokenizer or one that does not fit."""
        config = checkpoint.read_config(ckpt_dir)  # a clear error for a folder that is not a checkpoint, first
        try:
            tokenizer = load_tokenizer(ckpt_dir)
        except TokenizerError as e:
            raise GeneratorError(
                f"{ckpt_dir}: no usable tokenizer in the checkpoint folder ({e}); copy the source model's tokenizer "
                "file into it (checkpoint.save_streaming(..., files=[tokenizer file]) does this at conversion)"
            ) from None
        if tokenizer.vocab_size > config.vocab_size:  # checked before reading the weights
            raise GeneratorError(
                f"{ckpt_dir}: tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but config.json has "
                f"vocab_size {config.vocab_size}; the tokenizer file does not belong to this checkpoint"
            )
        return cls(checkpoint.load(ckpt_dir, mesh=mesh, dtype=dtype), tokenizer)

    def complete(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = TEMPERATURE,
        top_p: float | None = TOP_P,
        top_k: int | None = None,
        seed: int = 0,
        stop: Iterable[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The continuation of raw text `prompt` (encoded after a BOS token, special strings kept as text).

        `on_text(piece)` streams the text as it is generated (whole UTF-8 characters; stop strings are not applied
        to the stream, only to the returned text).

        The returned text ends before the stop token that ended generation, and before the first of the `stop`
        strings. Stop strings are applied to the decoded text afterwards: generation itself runs until a stop token
        or `max_new_tokens`, possibly past a stop string. temperature 0 is greedy; `seed` makes sampling repeatable.
        """
        if not prompt:
            raise GeneratorError("the prompt is empty; complete() needs some text to continue")
        ids = self.tokenizer.encode(prompt, bos=True)
        return self._generate_text(ids, max_new_tokens, temperature, top_p, top_k, seed, stop, on_text)

    def chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        reasoning: bool = False,
        max_new_tokens: int = 256,
        temperature: float = TEMPERATURE,
        top_p: float | None = TOP_P,
        top_k: int | None = None,
        seed: int = 0,
        stop: Iterable[str] = (),
    ) -> Reply:
        """The assistant's reply to `messages` (Message or {"role", "content"}), parsed by `chat.parse_reply`.

        `reasoning` uses the reasoning system prompt and splits the reply into reasoning and answer. Other arguments
        as in `complete`; stop strings cut the generated text before it is parsed.
        """
        if not messages:
            raise GeneratorError("chat() needs at least one message")
        ids = self._encode(render_chat(messages, reasoning=reasoning), "a chat prompt")
        text = self._generate_text(ids, max_new_tokens, temperature, top_p, top_k, seed, stop)
        return parse_reply(text, reasoning=reasoning)

    def sample_chat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        n: int,
        *,
        reasoning: bool = False,
        max_new_tokens: int = 256,
        temperature: float = TEMPERATURE,
        top_p: float | None = TOP_P,
        top_k: int | None = None,
        seed: int = 0,
    ) -> list[str]:
        """n sampled replies to `messages` as raw text (what follows the prompt, which in reasoning mode ends with
        "<think>\\n"; each text ends before its stop token), from one prefill of the prompt shared by the n samples
        (`generate(..., samples_per_prompt=n)`): what pass@k and GRPO sample."""
        if n < 1:
            raise GeneratorError(f"n must be at least 1, got {n}")
        ids = self._encode(render_chat(messages, reasoning=reasoning), "a chat prompt")
        out = self._generate_many(ids, n, max_new_tokens, temperature, top_p, top_k, seed)
        return [self.tokenizer.decode(until_stop(new, self._stop_ids)) for new in out]

    def predict_trace(
        self,
        source: str,
        entry_function: str,
        *,
        max_new_tokens: int = 1024,
        temperature: float = TEMPERATURE,
        top_p: float | None = TOP_P,
        top_k: int | None = None,
        seed: int = 0,
    ) -> list[Frame]:
        """The predicted execution trace of `entry_function` ("name" or "Class.method") of Python `source`.

        A last frame cut by `max_new_tokens` is dropped; a complete malformed frame raises ValueError (`parse_trace`).
        """
        ids = self._encode(render_trace_prompt(source, entry_function), "a trace prompt")
        return parse_trace(self._generate_text(ids, max_new_tokens, temperature, top_p, top_k, seed, ()))

    def predict_frames(
        self,
        source: str,
        entry_function: str,
        frames: Sequence[Frame] = (),
        *,
        event: str | None = None,
        one_frame: bool = False,
        max_new_tokens: int = 1024,
        temperature: float = TEMPERATURE,
        top_p: float | None = TOP_P,
        top_k: int | None = None,
        seed: int = 0,
    ) -> tuple[list[Frame], bool]:
        """The frames the model predicts after the trace prompt and `frames` (the trace so far: e.g. the entry's
        real call frame, which carries the inputs, or earlier predictions), as the release's debugger prompts it.

        `event` ("call", "line", "return", "exception") forces the next frame's event token; `one_frame` stops after
        the next frame. Returns (frames, ended): `ended` when the model closed the trace (<|end_of_text|> or another
        stop token) rather than `max_new_tokens` (clipped to the context left) or `one_frame` stopping it. Raises
        GeneratorError when the prompt fills the context. Parsing is lenient: a malformed frame
        ends the prediction there (the frames before it are returned, ended False).
        """
        if event is not None and event not in EVENT_SEP:
            raise GeneratorError(f"event must be one of {sorted(EVENT_SEP)} or None, got {event!r}")
        prefix = [*render_trace_prompt(source, entry_function), *render_trace(frames, end=False)]
        ids = self._encode(prefix, "a trace prompt")
        forced = self._encode([Segment("special", EVENT_SEP[event])], "an event") if event else []
        frame_sep = self._encode([Segment("special", FRAME_SEP)], "a frame separator")[0]
        room = self.model.config.max_position_embeddings - len(ids) - len(forced)
        if room < 1:
            raise GeneratorError(
                f"the trace prompt and its {len(frames)} frames take {len(ids) + len(forced)} tokens, the whole "
                f"context of {self.model.config.max_position_embeddings} (config max_position_embeddings)"
            )
        max_new_tokens = min(max_new_tokens, room)  # a trace runs until the model ends it or the context is full
        new = self._generate_ids(
            ids + forced, max_new_tokens, temperature, top_p, top_k, seed, extra_stops=(frame_sep,) if one_frame else ()
        )
        end = next((i for i, t in enumerate(new) if t in self._stop_ids or (one_frame and t == frame_sep)), None)
        ended = end is not None and new[end] in self._stop_ids
        text = (EVENT_SEP[event] if event else "") + self.tokenizer.decode(new if end is None else new[:end])
        if end is not None and new[end] == frame_sep:
            text += FRAME_SEP
        return parse_trace(text, strict=False), ended

    def _encode(self, segments, what: str) -> list[int]:
        try:
            return encode_segments(segments, self.tokenizer)
        except KeyError as e:
            raise GeneratorError(
                f"cannot encode {what}: {e.args[0]}; it needs a tokenizer with CWM's specials"
            ) from None

    def _streamer(self, on_text: Callable[[str], None]):
        """(token callback for generate(), finish) feeding `on_text` whole characters, silent from a stop token on."""
        decoder = self.tokenizer.stream_decoder()
        stopped = [False]

        def on_token(b: int, token: int) -> None:
            stopped[0] = stopped[0] or token in self._stop_ids
            if not stopped[0] and (piece := decoder.push(token)):
                on_text(piece)

        def finish() -> None:
            if tail := decoder.flush():
                on_text(tail)

        return on_token, finish

    def _generate_ids(self, ids, max_new_tokens, temperature, top_p, top_k, seed, on_text=None, extra_stops=()):
        """The new token ids (up to and including the stop token that ended generation, if any)."""
        return self._generate_many(ids, 1, max_new_tokens, temperature, top_p, top_k, seed, on_text, extra_stops)[0]

    def _generate_many(self, ids, n, max_new_tokens, temperature, top_p, top_k, seed, on_text=None, extra_stops=()):
        """n samples' new token ids from one prefill of `ids` (see `_generate_ids`)."""
        limit = self.model.config.max_position_embeddings
        if max_new_tokens < 1:
            raise GeneratorError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise GeneratorError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GeneratorError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and not 1 <= top_k <= self.model.config.vocab_size:
            raise GeneratorError(f"top_k must be in 1..{self.model.config.vocab_size}, got {top_k}")
        if len(ids) + max_new_tokens > limit:
            raise GeneratorError(
                f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
                f"context of {limit} tokens (config max_position_embeddings); shorten the prompt or lower "
                f"max_new_tokens to at most {limit - len(ids)}"
            )
        streamer = self._streamer(on_text) if on_text is not None else None
        new = generate(
            self.model,
            [ids],
            max_new_tokens,
            temperature=float(temperature),
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_ids=self._stop_ids | frozenset(extra_stops),
            on_token=streamer[0] if streamer else None,
            samples_per_prompt=n,
        )
        if streamer:
            streamer[1]()
        return new

    def _generate_text(self, ids, max_new_tokens, temperature, top_p, top_k, seed, stop, on_text=None) -> str:
        new = self._generate_ids(ids, max_new_tokens, temperature, top_p, top_k, seed, on_text)
        stop = [s for s in stop if s]
        text = self.tokenizer.decode(until_stop(new, self._stop_ids))  # before the stop token that ended generation
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
        return text[:cut]
