"""The opening of each chosen document of a long-corpus split, cut after a fixed number of tokens: a held-out set
small enough for CPU perplexity at 512 and 2,048 context (effconv eval --contexts-ppl 512,2048 reads every
document whole, so whole documents cost hours on a 2-core CPU). docs/moe.md cites its figures.

    PYTHONPATH=$PWD python bench/long_heads.py --split data/long/test.jsonl --every 2 --tokens 2060 --out heads.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from effconv.io.sources import load_causal_lm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True, help="a .jsonl split of data/long")
    ap.add_argument("--every", type=int, default=2, help="keep documents 0, N, 2N, ... (file order)")
    ap.add_argument("--tokens", type=int, default=2060, help="tokens kept from each document's start")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    _, tokenizer, _ = load_causal_lm(None)  # the default model's tokenizer, as effconv eval uses
    docs = [json.loads(line) for line in Path(args.split).read_text().splitlines() if line.strip()]
    with open(args.out, "w") as f:
        for doc in docs[:: args.every]:
            offsets = tokenizer(doc["text"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) <= args.tokens:
                raise SystemExit(f"{doc['title']} has only {len(offsets)} tokens")
            f.write(json.dumps({**doc, "text": doc["text"][: offsets[args.tokens][0]]}) + "\n")


if __name__ == "__main__":
    main()
