"""How much of each hybrid layer's normaliser the linear part holds, against position.

In the window + linear hybrid one normaliser sums the window weights (exp(score - rowmax): at most 1 each, at most
W together) and the linear weights (not rescaled, decayed with --decay). If the linear share keeps growing with
position, a model trained at T tokens reads its window less and less past T. This script runs an effconv export
over the opening `--length` tokens of long documents and reports, per converted hybrid layer and position bucket,
the mean share of the linear terms in the normaliser (averaged over heads, tokens and documents), beside each
layer's window mix and decay memory. It computes the full (T, T) weights of every layer: keep `--length` to a few
thousand tokens on a CPU.

    python bench/linear_share.py EXPORT --data data/long/validation.jsonl --length 2048 --docs 4 --out share.json
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
from effconv.modeling.attention_ops import hybrid_attention_weights  # noqa: E402


def linear_share(attn, q, k, features=None, log_gate=None) -> torch.Tensor:
    """(B, T) mean over heads of the linear terms' share of the hybrid normaliser of layer `attn` (`log_gate`: a
    gated layer's gates)."""
    feature_q, feature_k = features if features is not None else (q, k)
    fq, fk = attn.feature_map_q(feature_q), attn.feature_map_k(feature_k)
    weights = hybrid_attention_weights(q, k, fq, fk, attn.window_mix, window=attn.window, scale=attn.scale,
                                       eps=attn.config.linear_eps, log_decay=attn.log_decay(), log_gate=log_gate,
                                       sinks=attn.sinks)
    t = q.shape[2]
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(t, device=q.device)[None, :]
    return (weights * ((j <= i - attn.window) & (j >= attn.sinks))).sum(-1).mean(1)  # sinks: softmax terms


def hybrid_layers(model) -> list:
    return [a for a in model.converted_attentions() if a.layer_type == "linear" and a.window > 0]


@torch.no_grad()
def measure(model, sequences: list[list[int]], length: int) -> dict:
    """Per hybrid layer: mean linear share in each position bucket of `length` tokens, over `sequences`."""
    layers = hybrid_layers(model)
    if not layers:
        raise SystemExit("the model has no window + linear hybrid layers (pure linear layers hold the whole normaliser)")
    sums = {a.layer_idx: torch.zeros(length, dtype=torch.float64) for a in layers}
    originals = {}
    for attn in layers:
        def recording(q, k, v, cache, key_mask, features=None, log_gate=None, *rest, _attn=attn, _orig=attn._linear):
            sums[_attn.layer_idx] += linear_share(_attn, q, k, features, log_gate)[0].double().cpu()
            return _orig(q, k, v, cache, key_mask, features, log_gate, *rest)
        originals[attn] = attn._linear
        attn._linear = recording
    try:
        for ids in sequences:
            model(input_ids=torch.tensor([ids[:length]], device=model.device))
    finally:
        for attn, orig in originals.items():
            attn._linear = orig
    buckets = position_buckets(length)
    result = {}
    for attn in layers:
        mean = sums[attn.layer_idx] / len(sequences)
        log_decay = attn.log_decay()
        result[str(attn.layer_idx)] = {
            "window_mix": float(torch.sigmoid(attn.window_mix.float()).mean()),
            "decay_memory": None if log_decay is None else float((1 / (1 - log_decay.exp())).mean()),
            "share": {_bucket_label(a, b): float(mean[a:b].mean()) for a, b in buckets},
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an effconv export with window + linear hybrid layers")
    ap.add_argument("--data", required=True, help="a .jsonl / .txt file of long documents")
    ap.add_argument("--length", type=int, default=2048, help="tokens read from each document's start")
    ap.add_argument("--docs", type=int, default=4, help="at most this many documents of at least --length tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the JSON here (default: print only)")
    args = ap.parse_args()
    model, tokenizer, _ = load_causal_lm(args.model, device=args.device)
    sequences = []
    for text in load_texts(args.data):
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= args.length:
            sequences.append(ids[: args.length])
        if len(sequences) == args.docs:
            break
    if not sequences:
        raise SystemExit(f"no document of {args.data} has {args.length} tokens")
    layers = measure(model, sequences, args.length)
    record = {"model": args.model, "data": args.data, "length": args.length, "documents": len(sequences),
              "torch": torch.__version__, "device": str(model.device), "layers": layers}
    labels = list(next(iter(layers.values()))["share"])
    print("layer  mix  memory  " + "  ".join(f"{x:>9}" for x in labels))
    for idx, row in layers.items():
        memory = "-" if row["decay_memory"] is None else f"{row['decay_memory']:.0f}"
        print(f"{idx:>5}  {row['window_mix']:.2f}  {memory:>6}  " + "  ".join(f"{v:9.3f}" for v in row["share"].values()))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
