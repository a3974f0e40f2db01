"""One tokenizer interface over three sources: a tiktoken ranks file, transformers tokenizer.json, SentencePiece.

CWM's own tokenizer is the first (`tokenizer.model` of the native release: base64 token and rank per line, the
Llama-3 split pattern, 256 special tokens after the 128000 ranks); the Hugging Face release ships the same vocabulary as
`tokenizer.json`. All sources share one contract:

- `encode(text)` never parses special strings: user text holding "<|eot_id|>" gets ordinary tokens, not 128009.
  Specials enter a sequence only through `encode_special(name)` (or `bos=`/`eos=`).
- `decode(ids)` renders special tokens as their strings.
- `stream_decoder()` decodes token by token and never emits half of a multi-byte UTF-8 character.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

# The Llama-3 split pattern (spec section 3); two literals only for line length.
CWM_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_CWM_SPECIAL = 256
# Offsets k of the named CWM specials (id = 128000 + k for the real 128000-rank file); spec section 3.
CWM_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|pad|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    100: "<|frame_sep|>",
    101: "<|action_sep|>",
    102: "<|return_sep|>",
    103: "<|call_sep|>",
    104: "<|line_sep|>",
    105: "<|exception_sep|>",
    106: "<|arg_sep|>",
    107: "<|trace_context_start|>",
    120: "<|reasoning_thinking_start|>",
    121: "<|reasoning_thinking_end|>",
}
# Names looked up for bos/eos/pad in tokenizer.json files: CWM's first, then common ones of other models.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<|pad|>", "<pad>")
# Generation stops on any of these that exist (spec section 3), plus the EOS token.
_STOP_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
_EXPECTED = (
    "a tiktoken ranks file (base64 token and rank per line, e.g. CWM's tokenizer.model), a transformers "
    "tokenizer.json or a SentencePiece model"
)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read, or a request the tokenizer cannot serve."""


def cwm_special_tokens(offset: int = 128000) -> dict[str, int]:
    """The 256 CWM special tokens, name -> id: the named ones of the spec, others `<|reserved_special_token_{k}|>`.

    Ids are `offset + k`; CWM's ranks file has 128000 ranks, so the default gives the released ids.
    """
    return {CWM_NAMED_SPECIALS.get(k, f"<|reserved_special_token_{k}|>"): offset + k for k in range(NUM_CWM_SPECIAL)}


class Tokenizer:
    """Text <-> token ids. Built by `load_tokenizer`; subclasses adapt one library each."""

    def __init__(
        self, *, source: str, vocab_size: int, special_ids: dict[str, int], bos_id=None, eos_id=None, pad_id=None
    ):
        self.source = source
        self.vocab_size = vocab_size
        self._special_ids = dict(special_ids)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        stops = {self._special_ids[name] for name in _STOP_NAMES if name in self._special_ids}
        self.stop_ids: tuple[int, ...] = tuple(sorted(stops | ({eos_id} if eos_id is not None else set())))

    def __repr__(self):
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size})"

    @property
    def special_ids(self) -> dict[str, int]:
        """Special token name -> id (a copy)."""
        return dict(self._special_ids)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of user text; special strings in it are ordinary text. `bos`/`eos` add those tokens."""
        ids = self._encode(text)
        if bos:
            ids.insert(0, self._required(self.bos_id, "BOS"))
        if eos:
            ids.append(self._required(self.eos_id, "EOS"))
        return ids

    def encode_special(self, name: str) -> int:
        """The id of special token `name` (e.g. '<|eot_id|>'); KeyError naming it if the tokenizer has none."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of {self.source}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (ints, or any 1-D array of them); special tokens appear as their strings."""
        return self._decode(self._check_ids(ids))

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for tokens generated one at a time."""
        return StreamDecoder(self)

    # Subclass hooks. Sources with `_byte_stream` give each token's bytes; the others stream by diffing decodes.
    _byte_stream = False

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1} of {self.source}"
            )
        return ids

    def _required(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise TokenizerError(f"{self.source} has no {what} token")
        return token_id


class StreamDecoder:
    """Incremental decoding: `push` each new token id, print what it returns, call `flush` at the end.

    Concatenating every `push` and the final `flush` gives `tokenizer.decode(all ids)`. `push` returns only complete
    characters: bytes of a character split across tokens wait for the token that completes it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Decode-and-diff state (sources without a byte view), as in vLLM's incremental detokenizer: text is emitted
        # from decoding ids[prefix:], minus the text of ids[prefix:read] that was already emitted. Decoding a window
        # that starts a token earlier keeps context-dependent pieces (SentencePiece's leading space) right.
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def push(self, token_id: int) -> str:
        """Feed one token id; returns the text it completes (possibly '')."""
        (token_id,) = self._tok._check_ids([token_id])
        if self._tok._byte_stream:
            return self._utf8.decode(self._tok._token_bytes(token_id))
        self._ids.append(token_id)
        prefix_text = self._tok._decode(self._ids[self._prefix : self._read])
        new_text = self._tok._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing yet, or a character still incomplete
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """End of stream: whatever is held back, with U+FFFD for bytes that never formed a character."""
        if self._tok._byte_stream:
            return self._utf8.decode(b"", final=True)
        prefix_text = self._tok._decode(self._ids[self._prefix : self._read])
        new_text = self._tok._decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return new_text[len(prefix_text) :]


# --- tiktoken ranks file (CWM's native tokenizer.model) ---


class _TiktokenTokenizer(Tokenizer):
    _byte_stream = True

    def __init__(self, path: Path, data: bytes):
        import tiktoken

        ranks = _parse_ranks(path, data)
        # Specials follow the ranks: 128000 + k for CWM's file, len(ranks) + k for any other (e.g. a test's tiny file).
        specials = cwm_special_tokens(offset=len(ranks))
        self._enc = tiktoken.Encoding(
            path.stem, pat_str=CWM_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        super().__init__(
            source=str(path),
            vocab_size=len(ranks) + len(specials),
            special_ids=specials,
            bos_id=specials["<|begin_of_text|>"],
            eos_id=specials["<|end_of_text|>"],
            pad_id=specials["<|pad|>"],
        )

    def _encode(self, text):
        return self._enc.encode_ordinary(text)

    def _decode(self, ids):
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def _token_bytes(self, token_id):
        return self._enc.decode_single_token_bytes(token_id)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then the 256 CWM specials (256 + k): 512 ids, `cwm_tiny`'s vocabulary.

    For tiny models and CPU runs: nothing to train or download, every text round-trips, and the chat and trace
    formats keep their special tokens. `load_tokenizer("byte")` returns it.
    """

    _byte_stream = True

    def __init__(self):
        specials = cwm_special_tokens(offset=256)
        super().__init__(
            source="byte",
            vocab_size=256 + len(specials),
            special_ids=specials,
            bos_id=specials["<|begin_of_text|>"],
            eos_id=specials["<|end_of_text|>"],
            pad_id=specials["<|pad|>"],
        )
        self._names = {i: name for name, i in specials.items()}

    def _encode(self, text):
        return list(text.encode("utf-8"))

    def _decode(self, ids):
        return b"".join(self._token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def _token_bytes(self, token_id):
        return bytes([token_id]) if token_id < 256 else self._names[token_id].encode()


def _parse_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe: that one caches files by path name in
    # $TMPDIR/data-gym-cache, so a changed file at the same path would silently load its stale copy.
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{path}: line {lineno} is {line[:60]!r}; expected a base64 token and a rank (tiktoken ranks file)"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once, one per distinct token")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes (e.g. {missing[0]:#04x}) have no rank; need all 256")
    return ranks


# --- transformers tokenizer.json ---


class _HFTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{path}: not a readable transformers tokenizer.json ({e})") from None
        # tokenizers splits added special tokens out of the text before the model sees it; this switch makes it
        # tokenize their strings like any other text (not stored in the file, so set on every load).
        self._tok.encode_special_tokens = True
        self._tok.no_truncation()
        self._tok.no_padding()
        added = self._tok.get_added_tokens_decoder()
        specials = {t.content: i for i, t in sorted(added.items()) if t.special}

        def first(names):
            return next((specials[n] for n in names if n in specials), None)

        spec = json.loads(self._tok.to_str())
        decoder = spec.get("decoder") or {}
        decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        byte_level = (spec.get("model") or {}).get("type") == "BPE" and [d.get("type") for d in decoders] == [
            "ByteLevel"
        ]
        self._byte_stream = byte_level
        self._chars_to_byte = _byte_level_chars()
        super().__init__(
            source=str(path),
            vocab_size=self._tok.get_vocab_size(with_added_tokens=True),
            special_ids=specials,
            bos_id=first(_BOS_NAMES),
            eos_id=first(_EOS_NAMES),
            pad_id=first(_PAD_NAMES),
        )

    def _encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self._tok.decode(ids, skip_special_tokens=False)

    def _token_bytes(self, token_id):
        piece = self._tok.id_to_token(token_id)
        # The ByteLevel decoder's rule: a token made of byte-alphabet characters stands for those bytes; any other
        # token (an added token with characters outside the alphabet) is its own UTF-8 text.
        if all(c in self._chars_to_byte for c in piece):
            return bytes(self._chars_to_byte[c] for c in piece)
        return piece.encode()


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character that ByteLevel BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


# --- SentencePiece model ---

# SentencePiece piece types (sentencepiece_model.proto).
_SP_NORMAL, _SP_CONTROL, _SP_USER_DEFINED = 1, 3, 4
# User-defined pieces that look like markers (`<|eot_id|>`, `<mask>`) are specials; others (e.g. runs of spaces kept
# whole for code) are ordinary vocabulary and stay matched in text.
_MARKER = re.compile(r"<[^<>\s]+>")


class _SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, data: bytes):
        import sentencepiece as spm

        try:
            types = _sp_piece_types(data)
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        controls = [i for i, t in enumerate(types) if t == _SP_CONTROL]
        markers = [i for i, t in enumerate(types) if t == _SP_USER_DEFINED and _MARKER.fullmatch(pieces[i])]
        # SentencePiece always matches user-defined pieces in text, and decodes control pieces to ''. Two retyped
        # copies of the model give this module's contract with unchanged ids: one to encode, where marker pieces are
        # control (never matched in text), one to decode, where control pieces are user-defined (rendered).
        self._sp_encode = spm.SentencePieceProcessor(model_proto=_sp_retyped(data, dict.fromkeys(markers, _SP_CONTROL)))
        self._sp_decode = spm.SentencePieceProcessor(
            model_proto=_sp_retyped(data, dict.fromkeys(controls, _SP_USER_DEFINED))
        )

        def optional(i):
            return None if i < 0 else i

        super().__init__(
            source=str(path),
            vocab_size=len(pieces),
            special_ids={pieces[i]: i for i in sorted(controls + markers)},
            bos_id=optional(self._sp.bos_id()),
            eos_id=optional(self._sp.eos_id()),
            pad_id=optional(self._sp.pad_id()),
        )

    def _encode(self, text):
        return self._sp_encode.encode(text)

    def _decode(self, ids):
        return self._sp_decode.decode(ids)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _proto_fields(buf: bytes):
    """(field number, value, raw bytes) of each field of a protobuf message; value is an int or bytes."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf")
        yield key >> 3, value, buf[start:pos]


def _sp_piece_types(model_proto: bytes) -> list[int]:
    # ModelProto field 1 is the repeated SentencePiece {1: piece, 2: score, 3: type (default NORMAL)}.
    pieces = [value for field, value, _ in _proto_fields(model_proto) if field == 1]
    return [next((v for f, v, _ in _proto_fields(p) if f == 3), _SP_NORMAL) for p in pieces]


def _sp_retyped(model_proto: bytes, new_types: dict[int, int]) -> bytes:
    """The model with piece i's type set to new_types[i]; everything else byte for byte."""
    if not new_types:
        return model_proto
    out, index = bytearray(), 0
    for field, value, raw in _proto_fields(model_proto):
        if field == 1 and index in new_types:
            kept = b"".join(r for f, _, r in _proto_fields(value) if f != 3)
            piece = kept + b"\x18" + _varint(new_types[index])  # 0x18: field 3, varint
            raw = b"\x0a" + _varint(len(piece)) + piece  # 0x0a: field 1, length-delimited
        index += field == 1
        out += raw
    return bytes(out)


def train_sentencepiece(
    corpus_files: Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (),
    **options,
) -> Path:
    """Train a byte-fallback SentencePiece BPE model for code; returns the path of `{out_prefix}.model`.

    Text is kept as is (identity normalization, whitespace runs kept) so code round-trips. `special_tokens` become
    control pieces (ids 3, 4, ... after <unk>, <s>, </s>), which SentencePiece never matches in text. `options` are
    passed to `SentencePieceTrainer.train` and override the defaults. The files appear only once training succeeded.
    """
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        control_symbols=list(special_tokens),
        minloglevel=2,
    )
    settings.update(options)
    with tempfile.TemporaryDirectory(dir=out_prefix.parent) as tmp:
        tmp_prefix = Path(tmp) / out_prefix.name
        spm.SentencePieceTrainer.train(input=[str(f) for f in corpus_files], model_prefix=str(tmp_prefix), **settings)
        for suffix in (".vocab", ".model"):  # the .model last: its presence means a finished model
            os.replace(f"{tmp_prefix}{suffix}", f"{out_prefix}{suffix}")
    return Path(f"{out_prefix}.model")


# --- loading ---


def _is_ranks_file(data: bytes) -> bool:
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} [0-9]+", first) is not None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a file or a folder, or the `ByteTokenizer` for the name "byte".

    A file is a tiktoken ranks file (recognised by its first line), a `*.json` transformers tokenizer, or else a
    SentencePiece model. A folder is searched for, in order: `tokenizer.byte` (the ByteTokenizer's marker),
    `tokenizer.model` that is a ranks file, `tokenizer.json`,
    then a SentencePiece `tokenizer.model`, `spm.model` or other `*.model`. Anything else raises TokenizerError.
    """
    if str(path) == "byte":
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        return _load_from_folder(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file or folder; expected {_EXPECTED}, or a folder holding one")
    if path.suffix == ".json":
        return _HFTokenizer(path)
    data = path.read_bytes()
    if _is_ranks_file(data):
        return _TiktokenTokenizer(path, data)
    try:
        return _SentencePieceTokenizer(path, data)
    except TokenizerError:
        raise TokenizerError(f"{path}: not a tokenizer file; expected {_EXPECTED}") from None


def _load_from_folder(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.byte").is_file():  # a trained tiny model's export (cwm_jax.train.export)
        return ByteTokenizer()
    native = folder / "tokenizer.model"
    if native.is_file():
        data = native.read_bytes()
        if _is_ranks_file(data):
            return _TiktokenTokenizer(native, data)
    if (folder / "tokenizer.json").is_file():
        return _HFTokenizer(folder / "tokenizer.json")
    models = [folder / "tokenizer.model", folder / "spm.model"]
    models += [m for m in sorted(folder.glob("*.model")) if m not in models]
    for model in models:
        if model.is_file():
            return _SentencePieceTokenizer(model, model.read_bytes())
    raise TokenizerError(
        f"{folder}: no tokenizer found; expected tokenizer.model (tiktoken ranks or SentencePiece), tokenizer.json, "
        "spm.model or another SentencePiece *.model"
    )
