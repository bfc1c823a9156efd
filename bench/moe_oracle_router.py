"""How good can a router be? SmolLM2-135M -> 8 experts top-2 (split, co-activation), before any training: held-out
perplexity with effconv's activation-mass router and with an oracle that gives each token the top-k experts with
the largest actual output norm (computed by running every expert). CPU; docs/moe.md cites its figures.

    PYTHONPATH=$PWD:$PWD/kernels python bench/moe_oracle_router.py --text docs-and-readme.txt --out runs/oracle.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from effconv import data as data_lib  # noqa: E402
from effconv.io.sources import cache_root, load_causal_lm  # noqa: E402
from effconv.eval.quality import next_token_loss, perplexity  # noqa: E402
from effconv.modeling import moe as moe_mod  # noqa: E402
from effconv.pipelines.moe_upcycle import MoeUpcycleConfig
from effconv.conversion.moe import collect_mlp_inputs, dense_effconv_model, upcycle  # noqa: E402


def oracle_route(self, flat):
    """Top-k experts by the norm of their real output; equal weights (the split scales down_proj by k)."""
    ex = self.experts
    norms = []
    for e in range(self.num_experts):
        gate, up = F.linear(flat, ex.gate_up_proj[e]).chunk(2, -1)
        norms.append(F.linear(F.silu(gate) * up, ex.down_proj[e]).norm(dim=-1))
    top = torch.stack(norms, -1).topk(self.top_k, -1).indices
    return self.gate(flat), torch.full(top.shape, 1.0 / self.top_k, dtype=flat.dtype), top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True, help="text file: calibration and held-out blocks")
    ap.add_argument("--val-blocks", type=int, default=6)
    ap.add_argument("--out", default=None, help="also write the three perplexities as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher, tok, _ = load_causal_lm(None)
    train, val, _ = data_lib.prepare_data(args.text, tok, 256, teacher_factory=None, num_tokens=0,
                                          cache_dir=cache_root() / "data", val_fraction=0.15, seed=0)
    val = val[: args.val_blocks]
    dense = dense_effconv_model(teacher).requires_grad_(False)
    base = perplexity(next_token_loss(dense, val, batch_size=args.val_blocks))
    cfg = MoeUpcycleConfig(experts=8, top_k=2, method="split", split="coactivation", device="cpu",
                           calibration_tokens=4096)
    moe = upcycle(dense, collect_mlp_inputs(dense, train, 4096, 8), cfg)
    routed = perplexity(next_token_loss(moe, val, batch_size=args.val_blocks))
    moe_mod.MoeMLP.route = oracle_route
    oracle = perplexity(next_token_loss(moe, val, batch_size=args.val_blocks))
    print(f"teacher {base:.2f}; activation router {routed:.1f} ({routed / base:.1f}x); "
          f"oracle router {oracle:.1f} ({oracle / base:.1f}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f'{{"teacher_ppl": {base}, "activation_router_ppl": {routed}, '
                                  f'"oracle_router_ppl": {oracle}, "val_blocks": {args.val_blocks}}}\n')


if __name__ == "__main__":
    main()
