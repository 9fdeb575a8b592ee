"""``python -m train.checkpoint.run_safely MODULE ARGS...``: run a module (DeepSpeed's ``ds_to_universal``)
with every ``torch.load`` in it weights-only (train/checkpoint/safe_load.py)."""

from __future__ import annotations

import sys

from train.checkpoint.safe_load import run_module

if __name__ == "__main__":
    run_module(sys.argv[1:])
