"""Compile every Triton kernel for sm_90 (H100) on a machine without a GPU and report resources.

    python tests/kernels/compile_check.py            # bf16 and fp32, head dims 64 and 128, with and without decay
    python tests/kernels/compile_check.py --no-decay # only the HAS_DECAY=False variants
    PYTHONPATH=/path/to/triton-3.6 python tests/kernels/compile_check.py   # the device's Triton version

Prints registers, spill bytes (ptxas -v of the generated PTX), shared memory and whether the tensor-core
path is wgmma (Hopper) or mma (Ampere-style). Launch options mirror the defaults of the host code; a
compile error, a spill or shared memory over the H100's 227 KiB shows up here before any GPU time.
Not a pytest test (no test_ prefix).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from effconv_kernels.common import chunk_state as cs  # noqa: E402
from effconv_kernels.hybrid_attn import fused as hf  # noqa: E402
from effconv_kernels.hybrid_attn import recurrent as hr  # noqa: E402
from effconv_kernels.linear_attn import chunk as lc  # noqa: E402
from effconv_kernels.linear_attn import recurrent as lr  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448


def _ptxas() -> str:
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX versions newer Triton emits
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return "ptxas"


def compile_one(label, fn, types, consts, num_warps, num_stages):
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    # what the launcher specializes at run time: 16-byte aligned pointers, T and L multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in ("T", "L")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    try:
        c = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001
        print(f"{label:34s} COMPILE ERROR {type(e).__name__}: {str(e)[:400]}")
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    out = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", out)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    mma = "wgmma" if "wgmma" in c.asm["ptx"] else ("mma" if "mma.sync" in c.asm["ptx"] else "-")
    smem = c.metadata.shared
    flag = "  <-- over shared memory" if smem > SMEM_LIMIT else ""
    print(f"{label:34s} warps={num_warps} stages={num_stages} regs={regs[:1]} spill(st,ld)={spill[:1]} "
          f"smem={smem} {mma}{flag}")
    return smem <= SMEM_LIMIT


def main() -> int:
    ok = True
    decays = (False, True) if "--no-decay" not in sys.argv else (False,)
    for dt, decay in [(dt, decay) for dt in ("bf16", "fp32") for decay in decays]:
        P = "*" + dt
        prec = "tf32x3" if dt == "fp32" else "tf32"
        BT = 32 if dt == "fp32" else 64  # chunk_size()
        for D in (64, 128):
            F, DV = 2 * D, D
            BD, BF, BV = D, F, DV
            tag = f"{dt} D={D}" + (" decay" if decay else "")
            BK, BVs = 32, 32  # _state_tiles() on a small batch
            ok &= compile_one(f"state_fwd {tag}", cs.chunk_state_fwd_kernel,
                              dict(fk=P, v=P, S0="*fp32", z0="*fp32", h=P, zh="*fp32", ST="*fp32", zT="*fp32",
                                   ld="*fp32", T="i32", L="i32", NS="i32", HKV="i32"),
                              dict(F=F, DV=DV, BT=BT, BK=BK, BV=BVs, HAS_S0=True, PREC=prec, HAS_DECAY=decay), 4, 2)
            ok &= compile_one(f"state_bwd {tag}", cs.chunk_state_bwd_kernel,
                              dict(fq=P, do=P, rden="*fp32", dden="*fp32", beta="*fp32", dST="*fp32", dzT="*fp32",
                                   dh=P, dzh="*fp32", dS0="*fp32", dz0="*fp32", ld="*fp32", T="i32", G="i32", H="i32",
                                   NT="i32", D_OFF="i32", L="i32"),
                              dict(F=F, DV=DV, BT=BT, BK=BK, BV=BVs, NORMALIZE=True, HAS_BETA=True, HAS_DFINAL=True,
                                   PREC=prec, HAS_DECAY=decay), 4, 2)
            ok &= compile_one(f"lin_fwd {tag}", lc.linear_fwd_o_kernel,
                              dict(fq=P, fk=P, v=P, h=P, zh="*fp32", o=P, rden="*fp32", ld="*fp32", T="i32", G="i32",
                                   H="i32", NS1="i32", eps="fp32"),
                              dict(F=F, DV=DV, BT=BT, BF=BF, BV=BV, NORMALIZE=True, PREC=prec, HAS_DECAY=decay),
                              8 if BF + BV > 256 else 4, 1)
            ok &= compile_one(f"lin_dq {tag}", lc.linear_bwd_dq_kernel,
                              dict(fk=P, v=P, h=P, zh="*fp32", do=P, rden="*fp32", dden="*fp32", dq=P, fq=P,
                                   ld="*fp32", dld="*fp32", T="i32", G="i32", H="i32", NS1="i32"),
                              dict(F=F, DV=DV, BT=BT, BK=64, BV=BV, NORMALIZE=True, PREC=prec, HAS_DECAY=decay), 4, 1)
            ok &= compile_one(f"lin_dkv {tag}", lc.linear_bwd_dkv_kernel,
                              dict(fq=P, fk=P, v=P, dh=P, dzh="*fp32", do=P, rden="*fp32", dden="*fp32", dk=P, dv=P,
                                   h=P, zh="*fp32", ld="*fp32", dld="*fp32", T="i32", G="i32", H="i32", NT="i32"),
                              dict(F=F, DV=DV, BT=BT, BF=BF, BV=BV, NORMALIZE=True, PREC=prec, HAS_DECAY=decay),
                              8 if BF + BV >= 192 else 4, 1)
            hyb = dict(D=D, F=F, DV=DV, BT=BT, BD=BD, BF=BF, BV=BV, PREC=prec, HAS_DECAY=decay)
            hyb_bwd = dict(hyb, NEED_QKV=True)
            ok &= compile_one(f"hyb_fwd {tag}", hf.hybrid_fwd_kernel,
                              dict(q=P, k=P, v=P, fq=P, fk=P, mix="*fp32", h=P, zh="*fp32", o=P, ywin=P,
                                   rden="*fp32", mrow="*fp32", jstar="*i32", ld="*fp32", T="i32", G="i32", H="i32",
                                   NS1="i32", D_OFF="i32", W="i32", scale="fp32", eps="fp32"),
                              hyb, 8, 2 if BD + BF + BV <= 256 else 1)
            ok &= compile_one(f"hyb_dq {tag}", hf.hybrid_bwd_dq_kernel,
                              dict(q=P, k=P, v=P, fq=P, fk=P, mix="*fp32", h=P, zh="*fp32", do=P, rden="*fp32",
                                   dden="*fp32", mrow="*fp32", jstar="*i32", dq=P, dfq=P, dm="*fp32", ld="*fp32",
                                   dld="*fp32", T="i32", G="i32", H="i32", NS1="i32", D_OFF="i32", W="i32",
                                   scale="fp32"),
                              hyb_bwd, 8, 1)
            ok &= compile_one(f"hyb_dkv {tag}", hf.hybrid_bwd_dkv_kernel,
                              dict(q=P, k=P, v=P, fq=P, fk=P, mix="*fp32", dh=P, dzh="*fp32", do=P, rden="*fp32",
                                   dden="*fp32", mrow="*fp32", jstar="*i32", dm="*fp32", dk=P, dv=P, dfk=P, h=P,
                                   zh="*fp32", ld="*fp32", dld="*fp32", T="i32", L="i32", G="i32", H="i32", NT="i32",
                                   D_OFF="i32", W="i32", scale="fp32", NS1="i32"),
                              hyb_bwd, 8, 1)
            BKF = max(16, min(BF, 4096 // BV))
            ok &= compile_one(f"lin_decode {tag}", lr.linear_decode_kernel,
                              dict(fq=P, fk=P, v=P, S="*fp32", z="*fp32", o=P, ld="*fp32", G="i32", H="i32",
                                   eps="fp32"),
                              dict(F=F, DV=DV, BF=BF, BKF=BKF, BV=BV, NORMALIZE=True, HAS_DECAY=decay), 4, 3)
            ok &= compile_one(f"hyb_decode {tag}", hr.hybrid_decode_kernel,
                              dict(q=P, k=P, v=P, fq=P, fk=P, mix="*fp32", S="*fp32", z="*fp32", kb=P, vb=P,
                                   fkb=P, o=P, ld="*fp32", G="i32", H="i32", W="i32", slot="i32", n_valid="i32",
                                   evict="i32", scale="fp32", eps="fp32", pos="*i64"),
                              dict(D=D, F=F, DV=DV, BD=BD, BF=BF, BKF=BKF, BV=BV, BW=64, POS_ON_DEVICE=False,
                                   HAS_DECAY=decay), 4, 3)
    print("all compiled within shared memory" if ok else "SOME KERNELS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
