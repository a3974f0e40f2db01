"""Tokenizer: the three sources (tiktoken ranks, tokenizer.json, SentencePiece) built here from small corpora.

Independent references: tiktoken's pure-Python BPE (`tiktoken._educational`), transformers' fast tokenizer and its
tiktoken -> tokenizer.json converter, the `regex` module for the split pattern.
"""

import collections
import inspect
import textwrap

import pytest
import regex
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cwm_jax.tokenizer import (
    CWM_SPLIT_PATTERN,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    cwm_special_tokens,
    load_tokenizer,
    train_sentencepiece,
)

PROSE = (
    "Héllo wörld, café crème brûlée. Ünïcödé façade naïve résumé.\n"
    "日本語のテキストです。中文文本，韩国어 텍스트.\n"
    "Emoji: 😀 🎉 👍🏽 and a flag 🇫🇷.\n"
)
CODE = textwrap.dedent(inspect.getsource(textwrap))
CORPUS = (CODE + PROSE) * 2
# Characters outside the corpus: the tokenizers have to split them across byte tokens.
TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(1234567, 89))\n",
    "naïve café 日本語 😀 — and new: 🦀 ÆØÅ 漢字 𝔘𝔫𝔦 ﷽ e\u0301\n\ttabs  and   spaces ",
    "don't we'll I'M 12345 x=3.14159; {'k': [1, 2]}",
]
WITH_SPECIALS = "user says <|eot_id|> then <|begin_of_text|><|frame_sep|> and <|reserved_special_token_7|>."
SP_SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|frame_sep|>"]


def _train_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent pair within split-pattern words, repeatedly."""
    words = collections.Counter()
    for word, count in collections.Counter(regex.findall(CWM_SPLIT_PATTERN, text)).items():
        words[tuple(bytes([b]) for b in word.encode())] += count
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        ranks.setdefault(a + b, len(ranks))
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return ranks


def _write_ranks(path, ranks):
    import base64

    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tokenizer file of each source: {"tiktoken": path, "json": path, "sp": path}, plus the ranks."""
    root = tmp_path_factory.mktemp("tok")
    ranks = _train_ranks(CORPUS, 300)
    (root / "tt").mkdir()
    _write_ranks(root / "tt" / "tokenizer.model", ranks)

    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(CWM_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    n_model = hf.get_vocab_size()
    hf.add_special_tokens(list(cwm_special_tokens()))
    (root / "hf").mkdir()
    hf.save(str(root / "hf" / "tokenizer.json"))

    (root / "corpus.txt").write_text(CORPUS)
    (root / "sp").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "sp" / "spm"),
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=SP_SPECIALS,
        minloglevel=2,
    )
    return dict(
        tiktoken=root / "tt" / "tokenizer.model",
        json=root / "hf" / "tokenizer.json",
        sp=root / "sp" / "spm.model",
        ranks=ranks,
        n_model=n_model,
        root=root,
    )


@pytest.fixture(scope="module", params=["tiktoken", "json", "sp"])
def tok(request, files) -> Tokenizer:
    return load_tokenizer(files[request.param])


def test_cwm_special_tokens_match_spec_table():
    specials = cwm_special_tokens()
    assert len(specials) == 256 and sorted(specials.values()) == list(range(128000, 128256))
    for name, i in [
        ("<|begin_of_text|>", 128000),
        ("<|end_of_text|>", 128001),
        ("<|reserved_special_token_2|>", 128002),
        ("<|pad|>", 128004),
        ("<|start_header_id|>", 128006),
        ("<|end_header_id|>", 128007),
        ("<|eom_id|>", 128008),
        ("<|eot_id|>", 128009),
        ("<|frame_sep|>", 128100),
        ("<|trace_context_start|>", 128107),
        ("<|reasoning_thinking_end|>", 128121),
        ("<|reserved_special_token_255|>", 128255),
    ]:
        assert specials[name] == i


def test_split_pattern():
    parts = [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
    assert CWM_SPLIT_PATTERN == "|".join(parts)
    for text in TEXTS:
        assert "".join(regex.findall(CWM_SPLIT_PATTERN, text)) == text
    assert regex.findall(CWM_SPLIT_PATTERN, "don't DON'T") == ["don", "'t", " DON", "'T"]
    assert regex.findall(CWM_SPLIT_PATTERN, "x 1234567") == ["x", " ", "123", "456", "7"]
    assert regex.findall(CWM_SPLIT_PATTERN, "a  b\n\n  c") == ["a", " ", " b", "\n\n", " ", " c"]


def test_tiktoken_source_ids_and_reference_encoding(files):
    t = load_tokenizer(files["tiktoken"])
    n = len(files["ranks"])
    assert n > 400  # the merges really were learned
    assert t.vocab_size == n + 256 and len(t.special_ids) == 256
    assert t.special_ids == cwm_special_tokens(offset=n)
    assert (t.encode_special("<|begin_of_text|>"), t.encode_special("<|eot_id|>")) == (n, n + 9)
    assert t.encode_special("<|frame_sep|>") == n + 100
    assert t.encode_special("<|reserved_special_token_50|>") == n + 50
    assert (t.bos_id, t.eos_id, t.pad_id, t.stop_ids) == (n, n + 1, n + 4, (n + 1, n + 8, n + 9))
    reference = pytest.importorskip("tiktoken._educational").SimpleBytePairEncoding(
        pat_str=CWM_SPLIT_PATTERN, mergeable_ranks=files["ranks"]
    )
    for text in [*TEXTS, WITH_SPECIALS]:
        assert t.encode(text) == reference.encode(text, visualise=None)
    assert len(t.encode(CODE)) < len(CODE.encode()) / 2  # merges are used


def test_round_trip(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    ids = tok.encode(TEXTS[0], bos=tok.bos_id is not None)
    assert tok.decode(ids[1:] if tok.bos_id is not None else ids) == TEXTS[0]


def test_special_strings_in_user_text_stay_text(tok):
    special = set(tok.special_ids.values())
    assert tok.encode_special("<|eot_id|>") in special
    ids = tok.encode(WITH_SPECIALS)
    assert not special & set(ids), "a special string in user text was encoded as a special token"
    assert tok.decode(ids) == WITH_SPECIALS
    assert tok.encode("<|eot_id|>") != [tok.encode_special("<|eot_id|>")]
    # Specials enter only by name, and decode renders them as their strings.
    ids = [*tok.encode("a"), tok.encode_special("<|eot_id|>"), *tok.encode("b")]
    assert tok.decode(ids).replace(" ", "") == "a<|eot_id|>b"
    with pytest.raises(KeyError, match="<|nope|>"):
        tok.encode_special("<|nope|>")


def test_stream_decoder_matches_decode(tok):
    for text in [*TEXTS, WITH_SPECIALS]:
        ids = tok.encode(text)
        stream = tok.stream_decoder()
        assert isinstance(stream, StreamDecoder)
        chunks = [stream.push(i) for i in ids]
        tail = stream.flush()
        assert "".join(chunks) + tail == tok.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks), "half a character was emitted"
    # The split characters really were held back: some push returned nothing.
    assert "" in [stream.push(i) for stream in [tok.stream_decoder()] for i in tok.encode("🦀")]


def test_stream_decoder_broken_tail_and_bad_ids(files):
    t = load_tokenizer(files["tiktoken"])
    first_byte = files["ranks"][b"\xe6"]  # lead byte of a 3-byte character, never completed
    stream = t.stream_decoder()
    assert stream.push(t.encode("x")[0]) == "x"
    assert stream.push(first_byte) == ""
    assert stream.flush() == "\ufffd" == t.decode([first_byte])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        t.decode([t.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        stream.push(-1)


def test_json_source_ids(files):
    t = load_tokenizer(files["json"])
    n = files["n_model"]
    assert t.vocab_size == n + 256 and t.special_ids == cwm_special_tokens(offset=n)
    assert (t.bos_id, t.eos_id, t.pad_id, t.stop_ids) == (n, n + 1, n + 4, (n + 1, n + 8, n + 9))


def test_json_source_matches_transformers(files):
    transformers = pytest.importorskip("transformers")
    path = str(files["json"])
    t = load_tokenizer(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    for text in TEXTS:
        assert t.encode(text) == fast.encode(text, add_special_tokens=False)
    # Plain transformers parses the special strings; with split_special_tokens it agrees with encode.
    assert t.encode_special("<|eot_id|>") in fast.encode(WITH_SPECIALS, add_special_tokens=False)
    split = transformers.PreTrainedTokenizerFast(tokenizer_file=path, split_special_tokens=True)
    assert t.encode(WITH_SPECIALS) == split.encode(WITH_SPECIALS, add_special_tokens=False)


def test_tiktoken_and_converted_tokenizer_json_agree(files, tmp_path, monkeypatch):
    """CWM ships one vocabulary twice (tokenizer.model, tokenizer.json): both routes must give the same ids."""
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # the converter reads with tiktoken's path-keyed cache otherwise
    n = len(files["ranks"])
    converted = TikTokenConverter(
        vocab_file=str(files["tiktoken"]), pattern=CWM_SPLIT_PATTERN, extra_special_tokens=cwm_special_tokens(n)
    ).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    native, hf = load_tokenizer(files["tiktoken"]), load_tokenizer(tmp_path)
    assert hf.special_ids == native.special_ids and hf.vocab_size == native.vocab_size
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.stop_ids) == (
        native.bos_id,
        native.eos_id,
        native.pad_id,
        native.stop_ids,
    )
    for text in [*TEXTS, WITH_SPECIALS, CODE]:
        ids = native.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == native.decode(ids) == text
    ids = [native.bos_id, *native.encode(TEXTS[1]), native.encode_special("<|eot_id|>")]
    assert hf.decode(ids) == native.decode(ids)


def test_sentencepiece_source(files):
    t = load_tokenizer(files["sp"])
    sp = spm.SentencePieceProcessor(model_file=str(files["sp"]))
    assert t.vocab_size == 400 == sp.get_piece_size()
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, None)
    # Control pieces and the marker-like user-defined ones are the specials, ids as SentencePiece numbers them.
    assert t.special_ids == {"<s>": 1, "</s>": 2, **{name: 3 + k for k, name in enumerate(SP_SPECIALS)}}
    assert t.stop_ids == (2, t.encode_special("<|eot_id|>"))
    # SentencePiece itself matches the user-defined piece in text; this module does not.
    assert t.encode_special("<|eot_id|>") in sp.encode(WITH_SPECIALS)
    assert sp.encode(TEXTS[0]) == t.encode(TEXTS[0])  # ordinary text: same ids as SentencePiece
    assert t.decode([1, 2]) == "<s></s>"


def test_train_sentencepiece(files, tmp_path):
    path = train_sentencepiece(
        [files["root"] / "corpus.txt"], tmp_path / "out" / "code", 600, special_tokens=SP_SPECIALS
    )
    assert path == tmp_path / "out" / "code.model"
    assert sorted(p.name for p in path.parent.iterdir()) == ["code.model", "code.vocab"]
    t = load_tokenizer(path.parent)
    assert t.special_ids == {"<s>": 1, "</s>": 2, **{name: 3 + k for k, name in enumerate(SP_SPECIALS)}}
    for text in TEXTS:
        assert t.decode(t.encode(text)) == text
    assert not set(t.special_ids.values()) & set(t.encode(WITH_SPECIALS))
    assert t.decode([t.encode_special("<|frame_sep|>")]) == "<|frame_sep|>"


def test_folder_search_order(files, tmp_path):
    tt, js, sp = (files[k].read_bytes() for k in ("tiktoken", "json", "sp"))

    def folder(name, contents):
        d = tmp_path / name
        d.mkdir()
        for file, data in contents.items():
            (d / file).write_bytes(data)
        return load_tokenizer(d)

    both = folder("both", {"tokenizer.model": tt, "tokenizer.json": js, "spm.model": sp})
    assert type(both).__name__ == "_TiktokenTokenizer" and both.vocab_size == len(files["ranks"]) + 256
    json_first = folder("json_sp", {"tokenizer.json": js, "spm.model": sp, "tokenizer.model": sp})
    assert json_first.source.endswith("tokenizer.json")
    assert folder("sp_named_tokenizer", {"tokenizer.model": sp}).vocab_size == 400
    assert folder("other_model", {"code.model": sp, "notes.txt": b"hi"}).source.endswith("code.model")
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        folder("empty", {"notes.txt": b"hi"})


def test_bad_files_name_the_file(files, tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 not a model \xff" * 10)
    with pytest.raises(TokenizerError, match="junk.model.*expected a tiktoken ranks file"):
        load_tokenizer(junk)
    broken = tmp_path / "broken.model"
    broken.write_bytes(files["tiktoken"].read_bytes().replace(b"\n", b"\n!!! 12\n", 1))
    with pytest.raises(TokenizerError, match="broken.model: line 2"):
        load_tokenizer(broken)
    gap = tmp_path / "gap.model"
    _write_ranks(gap, {t: r + (r >= 300) for t, r in files["ranks"].items()})
    with pytest.raises(TokenizerError, match="gap.model: ranks are not"):
        load_tokenizer(gap)
    few = tmp_path / "few.model"
    _write_ranks(few, {bytes([b]): b for b in range(200)})
    with pytest.raises(TokenizerError, match="few.model: 56 single bytes"):
        load_tokenizer(few)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(TokenizerError, match="tokenizer.json: not a readable"):
        load_tokenizer(bad_json)
    with pytest.raises(TokenizerError, match="missing: no such file"):
        load_tokenizer(tmp_path / "missing")


def test_json_without_byte_level_streams_by_decode_diff(tmp_path):
    """A Metaspace (SentencePiece-style) tokenizer.json: no byte view, no BOS; streaming diffs decodes."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>"], show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert not t._byte_stream and t.bos_id is None and t.special_ids == {"<unk>": 0}
    text = "def fill(text, width): café 日本語 😀 return"
    ids = t.encode(text)
    stream = t.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == t.decode(ids) == text
    with pytest.raises(TokenizerError, match="has no BOS"):
        t.encode("x", bos=True)


def test_cwm_tokenizer_cli_trains_and_encodes(tmp_path, capsys):
    from cwm_jax import tokenizer_cli

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # café 数据\n" * 40), encoding="utf-8")
    prefix = tmp_path / "tok" / "spm"
    assert tokenizer_cli.main(["train", str(corpus), "--out", str(prefix), "--vocab-size", "300"]) == 0
    assert "vocab_size 300" in capsys.readouterr().out
    tok = load_tokenizer(f"{prefix}.model")
    assert tok.encode_special("<|eot_id|>") >= 0 and "<|frame_sep|>" in tok.special_ids
    text = "def add(a, b):\n    return a + b  # café <|eot_id|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_special("<|eot_id|>") not in tok.encode(text)
    assert tokenizer_cli.main(["encode", "--tokenizer", f"{prefix}.model", "return a"]) == 0
    ids_line = capsys.readouterr().out.splitlines()[0]
    assert [int(i) for i in ids_line.split()] == tok.encode("return a")
    assert (
        tokenizer_cli.main(["train", str(tmp_path / "missing.txt"), "--out", str(prefix), "--vocab-size", "300"]) == 2
    )
    assert "missing.txt: corpus file not found" in capsys.readouterr().err


def test_byte_tokenizer_round_trips_and_keeps_specials():
    tok = load_tokenizer("byte")
    text = "def f(x):\n    return x + 'é€'\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tok.vocab_size == 512 and ids[0] == tok.bos_id == 256 and ids[-1] == tok.eos_id == 257
    assert tok.decode(ids[1:-1]) == text
    assert tok.encode("<|eot_id|>") == list(b"<|eot_id|>")
    assert tok.decode([tok.encode_special("<|eot_id|>")]) == "<|eot_id|>"
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids[1:-1]) + stream.flush() == text
