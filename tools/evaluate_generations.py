"""Evaluate a policy's generated answers, optionally best-of-N reranked by a verifier (train/eval/rerank.py).

Examples:
    python tools/evaluate_generations.py --policy models/sft --data test.jsonl --metrics em,f1,numeric
    python tools/evaluate_generations.py --policy models/sft --data gsm8k_test.jsonl --n 8 --temperature 0.8 \\
        --verifier models/verifier --out runs/bon8

DATA is JSONL, `{"prompt": str, "answer": str}` or `{"prompt": str, "answers": [str, ...]}` per line (an "id" is
kept when present). Prompts are rendered as in training (the policy tokenizer's chat template, else
"user: ...\\nassistant: "). With --n 1 (the default) each prompt gets one answer (greedy unless --temperature);
with --n N > 1 the N sampled answers are scored by --verifier (an HF *ForSequenceClassification with one output,
e.g. a reward run's export, sharing the policy's tokenizer) and its highest-scored answer is kept.

Writes OUT/metrics.json (best_of_n, first, oracle: percentages per metric; verifier_score_mean; settings) and
OUT/predictions.jsonl (per prompt: id, prompt, references, every answer with its score and metrics, the chosen
index); OUT defaults to POLICY/eval. Prints the metrics as JSON. Bad input is one line,
`tessera: error: ...`, exit code 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from model.args import ModelConfigError
from tools import ToolParser, report_error
from train.data.corpus import DataError
from train.eval.rerank import RerankError, Settings, check_settings, run

PROG = "evaluate_generations"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ToolParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="HF causal-LM directory (config, weights, tokenizer)")
    p.add_argument("--data", required=True, help="JSONL of {prompt, answer | answers}")
    p.add_argument("--metrics", default="numeric",
                   help="comma-separated kinds among em, f1, numeric, rouge (default numeric)")
    p.add_argument("--plain", action="store_true", help="prompts as written, without the chat scaffold")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut answers before this string (repeatable; '\\n' is a newline)")
    p.add_argument("--no-stem", action="store_true", help="ROUGE without the Porter stemmer")
    p.add_argument("--labels", default=None, help="comma-separated label set: classification mode")
    p.add_argument("--n", type=int, default=1, help="answers sampled per prompt (default 1: plain evaluation)")
    p.add_argument("--verifier", default=None, help="HF *ForSequenceClassification directory (1 output); needed for N > 1")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens per answer, at most (default 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default 0, greedy, for N = 1; 1.0 for N > 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i (default 0)")
    p.add_argument("--out", default=None, help="output directory (default POLICY/eval)")
    p.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    return report_error(" ".join(message.split()))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 1.0)
    kinds = tuple(k.strip() for k in args.metrics.split(",") if k.strip())
    stop = tuple(text.encode("utf-8").decode("unicode_escape") for text in args.stop)
    labels = tuple(x.strip() for x in args.labels.split(",") if x.strip()) if args.labels is not None else ()
    if args.labels is not None and len(labels) < 2:
        return _fail(f"--labels={args.labels!r}: give two or more comma-separated labels")
    settings = Settings(n=args.n, max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k,
                        seed=args.seed, kinds=kinds, plain=args.plain, stop=stop, stem=not args.no_stem,
                        labels=labels)
    import torch

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as err:
        return _fail(f"--device={args.device}: {err}")
    try:
        check_settings(settings, args.verifier is not None)
        metrics = run(args.policy, args.data, settings, verifier=args.verifier, out_dir=args.out, device=device)
    except (RerankError, ModelConfigError, DataError) as err:
        return _fail(str(err))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
