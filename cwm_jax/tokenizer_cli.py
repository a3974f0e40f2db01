"""`cwm-tokenizer`: train a tokenizer for small CWM models, or look at how a tokenizer splits text.

    cwm-tokenizer train CORPUS [CORPUS ...] --out PREFIX --vocab-size N [--no-cwm-specials]
    cwm-tokenizer encode --tokenizer PATH TEXT

`train` writes a byte-fallback SentencePiece BPE model (`PREFIX.model`, `PREFIX.vocab`) that keeps code as is and, by
default, reserves CWM's named special tokens (chat headers, trace separators, ...) as control pieces.
Known errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from cwm_jax.tokenizer import CWM_NAMED_SPECIALS, TokenizerError, load_tokenizer, train_sentencepiece


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cwm-tokenizer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece BPE tokenizer on text files")
    train.add_argument("corpus", nargs="+", help="UTF-8 text files")
    train.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--no-cwm-specials", action="store_true", help="do not reserve CWM's named special tokens")
    encode = sub.add_parser("encode", help="print the ids and pieces of TEXT")
    encode.add_argument("--tokenizer", required=True, help="a tokenizer file or a folder holding one")
    encode.add_argument("text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            for path in args.corpus:
                if not os.path.isfile(path):
                    raise TokenizerError(f"{path}: corpus file not found")
            specials = [] if args.no_cwm_specials else list(CWM_NAMED_SPECIALS.values())
            model = train_sentencepiece(args.corpus, args.out, args.vocab_size, special_tokens=specials)
            tok = load_tokenizer(model)
            print(f"wrote {model}: vocab_size {tok.vocab_size}, {len(tok.special_ids)} special tokens")
        else:
            tok = load_tokenizer(args.tokenizer)
            ids = tok.encode(args.text)
            print(" ".join(map(str, ids)))
            print(" | ".join(tok.decode([i]) for i in ids))
    except (TokenizerError, OSError, RuntimeError) as e:  # SentencePiece reports bad settings as RuntimeError
        print(f"cwm-tokenizer {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
