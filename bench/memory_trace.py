"""What holds memory at the peak of `model.generate`, by context: every tensor an op creates is tracked (a
TorchDispatchMode) until its storage is freed, and the live set at the peak is listed (op, shape, dtype, bytes).
Works on any device (the CPU included, where torch keeps no allocator statistics), on the random SmolLM2-shaped
layouts of bench/generate.py.

    python bench/memory_trace.py --random-shape smollm2-135m-w64-long --layers 4 --batch 2 --contexts 512 4096 \\
        --device cpu --out runs/memory-trace.json

Prints and writes, per context, the peak of live tensor bytes created during the call (weights and inputs made
before it are not counted) and the largest live tensors at that peak; on CUDA also the allocator's peak above the
memory in use before the call (with the CUDA-graph step, which the tracker cannot see through: it runs with
`disable_compile=True`).
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages that ops created and that are still alive; the live set at the peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0
        self.alive: dict[int, tuple[str, tuple, str, int]] = {}
        self.at_peak: list[tuple[str, tuple, str, int]] = []
        self._op = ""

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.alive:
            return
        self.alive[key] = (self._op, tuple(t.shape), str(t.dtype).removeprefix("torch."), size)
        self.live += size
        if self.live > self.peak:
            self.peak, self.at_peak = self.live, list(self.alive.values())

        def freed(key=key, size=size):
            if self.alive.pop(key, None) is not None:
                self.live -= size

        weakref.finalize(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            self._track(o)
        return out


def build(shape: str, layers: int, device: str):
    from generate import random_shape_student

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return random_shape_student(shape, layers)[1].eval().to(device, dtype)


def main() -> None:
    from generate import RANDOM_SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-shape", default="smollm2-135m-w64-long", choices=sorted(RANDOM_SHAPES))
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--top", type=int, default=12, help="largest live tensors listed per context")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    model = build(args.random_shape, args.layers, args.device)
    rows = []
    for context in args.contexts:
        ids = torch.randint(3, model.config.vocab_size, (args.batch, context), device=args.device)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                      prefill_chunk_size=args.prefill_chunk)
        tracker = LiveTensors()
        with torch.inference_mode(), tracker:
            model.generate(ids, disable_compile=True, **kwargs)
        row = {"context": context, "peak_live_bytes": tracker.peak,
               "largest_at_peak": [dict(op=o, shape=s, dtype=d, bytes=b)
                                   for o, s, d, b in sorted(tracker.at_peak, key=lambda x: -x[3])[: args.top]]}
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.inference_mode():
                model.generate(ids, **kwargs)
            row["cuda_peak_above_base_bytes"] = torch.cuda.max_memory_allocated() - base
        rows.append(row)
        print(f"context {context}: peak live {tracker.peak / 2**20:.2f} MiB", flush=True)
        for item in row["largest_at_peak"][:5]:
            print(f"    {item['op']} {tuple(item['shape'])} {item['dtype']} {item['bytes'] / 2**20:.2f} MiB")
    ratio = rows[-1]["peak_live_bytes"] / rows[0]["peak_live_bytes"] if len(rows) > 1 else None
    result = {"shape": args.random_shape, "layers": args.layers, "batch": args.batch, "device": args.device,
              "prefill_chunk": args.prefill_chunk, "torch": torch.__version__, "rows": rows,
              "peak_ratio_last_over_first": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"peak ratio {args.contexts[-1]} / {args.contexts[0]}: {ratio:.3f}" if ratio else "", flush=True)


if __name__ == "__main__":
    main()
