#!/usr/bin/env bash
# Gathers what a bare GPU machine (torch + triton, no package registry) lacks to run tools/gpu/check.sh:
#   tools/gpu/bundle.sh [OUTDIR]        (default .gpu-bundle/, ignored by git; carry it to the GPU machine)
# Run on a machine with the package registry and Tessera's virtual environment active (it builds deepspeed's
# wheel against that torch). Makes:
#   OUTDIR/wheels/       the wheels of tools/gpu/requirements.txt for the GPU machine's Python (GPU_PYTHON,
#                        default 3.12, manylinux x86-64), deepspeed built from its sdist with DS_BUILD_OPS=0 (pure
#                        Python; its ops compile on first use). Tessera itself is not a wheel here: the check
#                        runs the working tree that travels with it (so it tests the code as it is)
#   OUTDIR/data_cache/   the smoke recipe's corpus, tokenizer and tokenized data (a data.cache_dir), so the check
#                        needs no network
#   OUTDIR/bundle.json   every wheel with its size and sha256, what was left out and why, the total size
# bitsandbytes and flash-attn are carried only when they fit the size limit (BUNDLE_LIMIT_MB, default 60);
# flash-attn has no wheel on the registry (an sdist that needs CUDA to build), so it never is: its tests skip.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/.gpu-bundle}" && cd "${1:-$ROOT/.gpu-bundle}" && pwd)"
PY="${PYTHON:-python}"
GPU_PYTHON="${GPU_PYTHON:-3.12}"
LIMIT_MB="${BUNDLE_LIMIT_MB:-60}"
DEEPSPEED="deepspeed==0.19.8"
BITSANDBYTES="bitsandbytes==0.50.2"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
FOR_GPU=(--no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp "${PLATFORMS[@]}")
say() { echo "tessera: bundle: $*" >&2; }

rm -rf "$OUT/wheels" "$OUT/data_cache" "$OUT/bundle.json"
mkdir -p "$OUT/wheels"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

say "wheels of tools/gpu/requirements.txt for Python $GPU_PYTHON"
"$PY" -m pip download -q --disable-pip-version-check "${FOR_GPU[@]}" -d "$OUT/wheels" \
    -r "$ROOT/tools/gpu/requirements.txt"

say "$DEEPSPEED from its sdist, without ops"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$TMP/sdist" "$DEEPSPEED"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$OUT/wheels" "$TMP"/sdist/deepspeed-*.tar.gz

LEFT_OUT="flash-attn: no wheel on the package registry (an sdist that builds only where CUDA is); its tests skip"
say "$BITSANDBYTES if it fits"
if "$PY" -m pip download -q --disable-pip-version-check "${FOR_GPU[@]}" -d "$TMP/bnb" "$BITSANDBYTES"; then
    used=$(du -sm "$OUT/wheels" | cut -f1)
    bnb=$(du -sm "$TMP/bnb" | cut -f1)
    if (( used + bnb + 10 <= LIMIT_MB )); then
        mv "$TMP"/bnb/*.whl "$OUT/wheels/"
    else
        LEFT_OUT="$LEFT_OUT|$BITSANDBYTES: its wheel is $bnb MB, over what the $LIMIT_MB MB limit leaves; QLoRA-on-CUDA tests skip"
    fi
else
    LEFT_OUT="$LEFT_OUT|$BITSANDBYTES: no wheel for Python $GPU_PYTHON; QLoRA-on-CUDA tests skip"
fi

say "the smoke recipe's tokenized corpus"
(cd "$ROOT" && HF_HUB_OFFLINE=1 "$PY" - "$OUT/data_cache" <<'EOF'
import sys
from train.config.load import load_config
from train.data.setup import setup_data

setup_data(load_config("train/configs/smoke.yaml", [f"data.cache_dir={sys.argv[1]}"]).data)
EOF
)
rm -rf "$OUT/data_cache/index"

"$PY" - "$OUT" "$LIMIT_MB" "$GPU_PYTHON" "$LEFT_OUT" <<'EOF'
import hashlib, json, sys
from pathlib import Path

out, limit_mb, python, left_out = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
wheels = [{"file": p.name, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
          for p in sorted((out / "wheels").glob("*.whl"))]
data = sum(p.stat().st_size for p in (out / "data_cache").rglob("*") if p.is_file())
total = sum(w["bytes"] for w in wheels) + data
meta = {"python": python, "wheels": wheels, "data_cache_bytes": data, "total_bytes": total,
        "left_out": [x for x in left_out.split("|") if x]}
(out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
print(f"tessera: bundle: {len(wheels)} wheels and the corpus in {out}: {total / 2**20:.1f} MiB", file=sys.stderr)
for x in meta["left_out"]:
    print(f"tessera: bundle: left out: {x}", file=sys.stderr)
if total > limit_mb * 2**20:
    sys.exit(f"tessera: error: the bundle is {total / 2**20:.1f} MiB, over BUNDLE_LIMIT_MB={limit_mb:g}")
EOF
