"""Export a Tessera checkpoint as a Hugging Face model directory (transformers loads it, no custom code).

Examples:
    python tools/export_hf.py runs/shakespeare                       # newest complete checkpoint
    python tools/export_hf.py runs/shakespeare/checkpoints/step_00000200 --out hf/step200 --dtype bfloat16

CKPT is a run directory (its newest complete checkpoint is used), its checkpoints/ directory, or one
checkpoint (checkpoints/step_N). Any ZeRO stage 0-3 works. The output holds model.safetensors,
config.json (LlamaConfig; Qwen2Config for a model with q/k/v biases), generation_config.json and the
tokenizer files; by default it is written to RUN_DIR/hf/step_N. A run of an HF model (hf.path) is written
as that model's own architecture; with LoRA, as the adapter in PEFT format (--merge: merged full weights).
The output path is printed on success.
The checkpoint is verified first (each file's size and sha256 against those recorded at save; for a run dir
a damaged newer checkpoint is skipped with a warning naming the file) and its files are read weights-only.
A checkpoint that cannot be exported (damaged, holding objects a weights-only load refuses, weights the
safetensors format refuses, ...) is reported in one line `tessera: error: ...`, with exit code 2; a failure
to read or write files (a missing permission, a full disk) in the same one line, with exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from model.hf_causal import DTYPES
from tools import ToolParser, report_error
from train.checkpoint.writer import CheckpointError
from train.export.hf import ExportError, export_hf, resolve_checkpoint

PROG = "export_hf"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this tool."""
    parser = ToolParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", type=Path, metavar="CKPT",
                        help="run dir, its checkpoints/ dir, or checkpoints/step_N")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/hf/step_N)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the saved weights (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--merge", action="store_true",
                        help="adapter runs (lora.r > 0): write the base with the adapter merged in, not the "
                             "adapter")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="the run's tokenizer dir, if it moved (its tokenizer.json must be unchanged)")
    return parser


def default_out(tag_dir: Path) -> Path:
    """RUN_DIR/hf/step_N for the checkpoint RUN_DIR/checkpoints/step_N."""
    return tag_dir.parent.parent / "hf" / tag_dir.name


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():  # DeepSpeed's consolidation needs no accelerator; say so, quietly
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        tag_dir = resolve_checkpoint(args.ckpt)
        out = export_hf(tag_dir, args.out or default_out(tag_dir), dtype=DTYPES[args.dtype],
                        overwrite=args.overwrite, tokenizer_dir=args.tokenizer, merge=args.merge)
    except (ExportError, CheckpointError) as err:
        return report_error(err)
    except OSError as err:  # the file system refused (permissions, a full disk): not the checkpoint's fault
        return report_error(f"{PROG}: {err}", code=1)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
