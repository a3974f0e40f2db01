"""Generator and cwm-generate on a tiny random CWM saved as a converted checkpoint with a tiny CWM-style tokenizer.

Independent paths: `generate` on the in-memory model decoded with the tokenizer (for `complete`), `encode_segments`
of the rendered prompts (for `chat` and `predict_trace`), `render_trace` of known frames (for trace parsing).
"""

import base64
import io
import json
import sys

import pytest
from flax import nnx

from cwm_jax import checkpoint
from cwm_jax import generator as generator_mod
from cwm_jax.chat import (
    Frame,
    Message,
    Reply,
    encode_segments,
    parse_reply,
    render_chat,
    render_trace,
    render_trace_prompt,
)
from cwm_jax.config import cwm_tiny
from cwm_jax.generate import generate
from cwm_jax.generate_cli import main
from cwm_jax.generator import Generator, GeneratorError
from cwm_jax.model import CwmModel
from cwm_jax.tokenizer import load_tokenizer

CONTEXT = 256
PROMPT = "def add(a, b):\n    return"
NEW = 12
# A few merges on top of the 256 bytes; each merged token is made of lower-ranked ones, as BPE needs.
MERGES = [b"  ", b"    ", b"de", b"def", b"re", b"ret"]
SOURCE = "def f(x):\n    y = x + 1\n    return y\n"


def _write_tokenizer(path):
    ranks = [bytes([b]) for b in range(256)] + MERGES
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    return path


def _save(dst, tokenizer_file=None, *, vocab_size=None, seed=0):
    tok = load_tokenizer(tokenizer_file) if tokenizer_file else None
    config = cwm_tiny(
        vocab_size=vocab_size or tok.vocab_size,
        num_layers=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=tok.bos_id if tok else 1,
        eos_token_ids=tok.stop_ids if tok else (2,),
    )
    model = CwmModel(config, rngs=nnx.Rngs(seed))
    files = [tokenizer_file] if tokenizer_file else []
    checkpoint.save_streaming(dst, config, checkpoint.model_leaves(model), files=files)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generator")
    tok_file = _write_tokenizer(root / "tokenizer.model")
    ckpt = root / "ckpt"
    model = _save(ckpt, tok_file)
    return dict(root=root, tok_file=tok_file, ckpt=ckpt, model=model, gen=Generator.from_checkpoint(ckpt))


def _greedy_text(model, tok, ids, n):
    """Reference: generate on the in-memory model, the stop token dropped, decoded."""
    (new,) = generate(model, [ids], n, temperature=0.0)
    if new and new[-1] in tok.stop_ids:
        new = new[:-1]
    return tok.decode(new), new


def test_from_checkpoint_loads_model_and_tokenizer(setup):
    gen = setup["gen"]
    assert gen.tokenizer.vocab_size == 256 + len(MERGES) + 256 == gen.model.config.vocab_size
    assert gen.tokenizer.stop_ids == gen.model.config.eos_token_ids
    assert gen.tokenizer.encode("def") == [256 + MERGES.index(b"def")]


def test_complete_greedy_matches_generate(setup):
    tok = setup["gen"].tokenizer
    want, ids = _greedy_text(setup["model"], tok, tok.encode(PROMPT, bos=True), NEW)
    assert len(ids) >= 4, "the random model stopped almost at once; the comparison would be weak"
    assert setup["gen"].complete(PROMPT, max_new_tokens=NEW, temperature=0) == want
    # Streaming: the pieces join to the same text.
    pieces = []
    assert setup["gen"].complete(PROMPT, max_new_tokens=NEW, temperature=0, on_text=pieces.append) == want
    assert "".join(pieces) == want and len(pieces) > 1


def test_complete_sampling_is_seeded(setup):
    gen = setup["gen"]
    a = gen.complete(PROMPT, max_new_tokens=NEW, seed=1)
    assert a == gen.complete(PROMPT, max_new_tokens=NEW, seed=1)
    assert a != gen.complete(PROMPT, max_new_tokens=NEW, temperature=0)


def test_sample_chat_is_n_samples_of_one_prefill(setup):
    """n samples from one shared prefill: the raw texts equal generating the same prompt n times in one batch."""
    from cwm_jax.chat import encode_segments, render_chat

    gen, messages = setup["gen"], [{"role": "user", "content": "hi"}]
    texts = gen.sample_chat(messages, 3, reasoning=True, max_new_tokens=NEW, temperature=1.0, seed=2)
    ids = encode_segments(render_chat(messages, reasoning=True), gen.tokenizer)
    stop = set(gen.tokenizer.stop_ids) | set(gen.model.config.eos_token_ids)
    outs = generate(setup["model"], [ids] * 3, NEW, temperature=1.0, top_p=0.95, seed=2, stop_ids=stop)
    want = [gen.tokenizer.decode(o[: next((i for i, t in enumerate(o) if t in stop), len(o))]) for o in outs]
    assert texts == want and len(set(texts)) > 1


def test_stop_strings_truncate(setup):
    gen = setup["gen"]
    full = gen.complete(PROMPT, max_new_tokens=NEW, temperature=0)
    stop = full[3:5]
    assert len(stop) == 2
    cut = gen.complete(PROMPT, max_new_tokens=NEW, temperature=0, stop=["never in the text \x00", stop])
    assert cut == full[: full.index(stop)]
    assert len(cut) < len(full)


def test_chat_prompt_ids_and_reply(setup, monkeypatch):
    gen, tok = setup["gen"], setup["gen"].tokenizer
    seen = []

    def recording_generate(model, prompts, *args, **kwargs):
        seen.append(prompts)
        return generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(generator_mod, "generate", recording_generate)
    messages = [Message("system", "Be brief."), {"role": "user", "content": "add 2 and 3 <|eot_id|>"}]
    reply = gen.chat(messages, reasoning=True, max_new_tokens=NEW, temperature=0)
    want_ids = encode_segments(render_chat(messages, reasoning=True), tok)
    assert seen == [[want_ids]]
    assert isinstance(reply, Reply)
    text, _ = _greedy_text(setup["model"], tok, want_ids, NEW)
    assert reply == parse_reply(text, reasoning=True)
    assert reply.reasoning is not None


def test_predict_trace_prompt_and_parse(setup, monkeypatch):
    gen, tok = setup["gen"], setup["gen"].tokenizer
    frames = [
        Frame("call", {"x": "1"}, "def f(x):"),
        Frame("line", {"x": ".."}, "    y = x + 1"),
        Frame("return", None, "    return y", "2"),
    ]
    seen = []

    def scripted_generate(model, prompts, max_new_tokens, **kwargs):
        seen.append(prompts)
        # The trace, its end token, then tokens a model may produce after it: they must be ignored.
        return [encode_segments(render_trace(frames), tok) + tok.encode("junk")]

    monkeypatch.setattr(generator_mod, "generate", scripted_generate)
    assert gen.predict_trace(SOURCE, "f", max_new_tokens=64) == frames
    assert seen == [[encode_segments(render_trace_prompt(SOURCE, "f"), tok)]]


def test_bad_inputs(setup, tmp_path):
    gen = setup["gen"]
    with pytest.raises(GeneratorError, match="prompt is empty"):
        gen.complete("")
    with pytest.raises(GeneratorError, match=r"exceeds the model's context of 256 .* at most 6"):
        gen.complete("x" * 249, max_new_tokens=7)  # 1 BOS + 249 tokens + 7 = 257
    with pytest.raises(GeneratorError, match="at least one message"):
        gen.chat([])
    with pytest.raises(GeneratorError, match="top_p"):
        gen.complete(PROMPT, max_new_tokens=NEW, top_p=0.0)
    with pytest.raises(ValueError, match="no function 'g'"):
        gen.predict_trace(SOURCE, "g")
    # A model whose vocabulary is smaller than the tokenizer's, in memory and as a checkpoint.
    small = CwmModel(cwm_tiny(vocab_size=300, num_layers=2), rngs=nnx.Rngs(0))
    with pytest.raises(GeneratorError, match="tokenizer .* has 518 ids but the model's vocab_size is 300"):
        Generator(small, gen.tokenizer)
    _save(tmp_path / "small", setup["tok_file"], vocab_size=300)
    with pytest.raises(GeneratorError, match="has 518 ids but config.json has vocab_size 300"):
        Generator.from_checkpoint(tmp_path / "small")
    _save(tmp_path / "bare", vocab_size=518)
    with pytest.raises(GeneratorError, match="no usable tokenizer in the checkpoint folder"):
        Generator.from_checkpoint(tmp_path / "bare")


def test_cli_prompt(setup, capsys):
    ckpt = str(setup["ckpt"])
    assert main(["--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out == setup["gen"].complete(PROMPT, max_new_tokens=NEW, temperature=0) + "\n"


def test_cli_chat_reads_stdin_until_eof(setup, capsys, monkeypatch):
    turns = []
    real_chat = Generator.chat

    def recording_chat(self, messages, **kwargs):
        turns.append(list(messages))
        return real_chat(self, messages, **kwargs)

    monkeypatch.setattr(Generator, "chat", recording_chat)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nadd 2 and 3\n"))
    args = ["--checkpoint", str(setup["ckpt"]), "--chat", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    assert [len(t) for t in turns] == [1, 3]  # the second turn sees the first exchange
    assert turns[1][0] == Message("user", "hello") and turns[1][1].role == "assistant"
    assert turns[1][2] == Message("user", "add 2 and 3")
    assert capsys.readouterr().err == ""


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cwm-generate: ") and "not a converted cwm-jax checkpoint" in err
    assert err.count("\n") == 1
    assert main(["--checkpoint", str(setup["ckpt"]), "--trace", "no_function_given.py"]) == 2
    err = capsys.readouterr().err
    assert "expected FILE.py:FUNC" in err and err.count("\n") == 1


def test_cli_trace_prints_frames_as_json(setup, tmp_path, capsys, monkeypatch):
    tok = setup["gen"].tokenizer
    frames = [Frame("call", {"x": "1"}, "def f(x):"), Frame("return", None, "    return y", "2")]
    monkeypatch.setattr(
        generator_mod, "generate", lambda model, prompts, n, **kw: [encode_segments(render_trace(frames), tok)]
    )
    (tmp_path / "prog.py").write_text(SOURCE)
    args = ["--checkpoint", str(setup["ckpt"]), "--trace", f"{tmp_path / 'prog.py'}:f", "--max-new-tokens", "64"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [Frame(**json.loads(line)) for line in lines] == frames
