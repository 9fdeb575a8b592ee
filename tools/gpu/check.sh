#!/usr/bin/env bash
# Every GPU path of Tessera in one command (logic and documentation: tools/gpu/check.py).
#   tools/gpu/check.sh OUTDIR              on the GPU machine, from the wheels of .gpu-bundle/ (tools/gpu/bundle.sh)
#   tools/gpu/check.sh --dry-run OUTDIR    the same script on CPU with tiny shapes and gloo (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" tools/gpu/check.py "$@"
