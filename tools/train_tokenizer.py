"""Train a byte-level BPE tokenizer on a corpus and save it as a Hugging Face tokenizer directory.

Examples:
    python tools/train_tokenizer.py --shakespeare data_cache --vocab-size 4096 --out data_cache/bpe4096
    python tools/train_tokenizer.py corpus/*.txt more.jsonl --vocab-size 32000 --out tok/ --text-field body
    python tools/train_tokenizer.py my_texts/ 'notes/**/*.md' --vocab-size 8000 --out tok/   # a tree, a glob

Inputs are files, directories (walked recursively; text, .jsonl and .parquet files read by suffix, other
files and empty files skipped with a count) and globs. Bad input is one `tessera: error: ...` line, exit 2.

The result loads with `transformers.AutoTokenizer.from_pretrained(out)`; `<|endoftext|>` is its
eos, bos and pad token.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tools import ToolParser, report_error
from tools.corpus_args import add_corpus_arguments, corpus_inputs
from train.data.corpus import DataError
from train.data.tokenizer import tokenizer_identity, train_bpe_tokenizer


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this tool."""
    parser = ToolParser(
        prog=f"tools/{Path(__file__).name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_corpus_arguments(parser, shakespeare_help="also train on Shakespeare's works, fetched once into CACHE_DIR")
    parser.add_argument("--vocab-size", type=int, required=True, help="target vocabulary size (>= 257)")
    parser.add_argument("--out", type=Path, required=True, help="output tokenizer directory")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count for a merge to be kept")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        inputs = corpus_inputs(args)
        train_bpe_tokenizer(
            inputs,
            args.vocab_size,
            args.out,
            text_field=args.text_field,
            min_frequency=args.min_frequency,
            overwrite=args.overwrite,
        )
    except DataError as err:
        return report_error(err)
    print(json.dumps(tokenizer_identity(args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
