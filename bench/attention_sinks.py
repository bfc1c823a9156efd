"""How much of the teacher's softmax attention lands on the first tokens of the sequence (attention sinks) and how
much on the last W tokens (what a window of W keeps), per layer and position bucket, on documents of a text file.

A window + linear hybrid keeps a query's last W keys in softmax and hands everything older, the first tokens
included, to the linear state; where the teacher puts a large, position-independent mass on the first token, the
linear part has to reproduce it from a state that forgets. This measures that mass.

    PYTHONPATH=$PWD python bench/attention_sinks.py --data data/long/validation.jsonl --docs 3 --length 1024 \
        --out sinks.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from effconv.data import load_texts  # noqa: E402
from effconv.eval.length import _bucket_label, position_buckets  # noqa: E402
from effconv.io.sources import load_causal_lm  # noqa: E402


@torch.no_grad()
def measure(model, sequences: list[list[int]], length: int, window: int, sinks: int) -> dict:
    """Per layer and position bucket: mean attention mass (over heads, queries and sequences) on the first `sinks`
    keys and on the last `window` keys (the query's own included)."""
    first = last = None
    for ids in sequences:
        out = model(input_ids=torch.tensor([ids[:length]], device=model.device), output_attentions=True)
        a = torch.stack(out.attentions)[:, 0].float()  # (L, H, T, T)
        t = a.shape[-1]
        i = torch.arange(t, device=a.device)[:, None]
        j = torch.arange(t, device=a.device)[None, :]
        f = a[..., :sinks].sum(-1).mean(1)  # (L, T)
        w = (a * ((j <= i) & (j > i - window))).sum(-1).mean(1)
        first = f if first is None else first + f
        last = w if last is None else last + w
    first, last = first / len(sequences), last / len(sequences)
    result = {"layers": []}
    for layer in range(first.shape[0]):
        row = {"first": {}, "window": {}}
        for a, b in position_buckets(length):
            if a < window:
                continue
            label = _bucket_label(a, b)
            row["first"][label] = round(float(first[layer, a:b].mean()), 4)
            row["window"][label] = round(float(last[layer, a:b].mean()), 4)
        result["layers"].append(row)
    labels = list(result["layers"][0]["first"])
    result["mean"] = {key: {label: round(sum(r[key][label] for r in result["layers"]) / first.shape[0], 4)
                            for label in labels} for key in ("first", "window")}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="teacher (default: the default model)")
    ap.add_argument("--data", required=True, help="text / .jsonl file of documents")
    ap.add_argument("--docs", type=int, default=3, help="documents of at least --length tokens to use")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=1, help="how many first tokens count as the sink")
    ap.add_argument("--out", required=True, help="JSON output")
    args = ap.parse_args()
    model, tokenizer, source = load_causal_lm(args.model)
    model.config._attn_implementation = "eager"  # attention weights are returned by the eager path only
    sequences = [ids for ids in (tokenizer(text).input_ids for text in load_texts(args.data, split_long=False)) if len(ids) >= args.length]
    if not sequences:
        raise SystemExit(f"no document of {args.data} has {args.length} tokens")
    sequences = sequences[: args.docs]
    result = measure(model.eval(), sequences, args.length, args.window, args.sinks)
    result.update(model=source.description or source.path, data=args.data, documents=len(sequences), length=args.length, window=args.window,
                  sinks=args.sinks, torch=torch.__version__)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["mean"], indent=1))


if __name__ == "__main__":
    main()
