"""A developer tool, outside the wheel: compile every kernel for a GPU architecture *without a GPU* and check its
shared memory.

    python tools/compile_check.py                     # sm_90 (H100/H200), the default cases
    python tools/compile_check.py --arch 80 --case bf16,72,32 --case fp32,160,128

Triton lowers each kernel to PTX and assembles it with the ptxas bundled in its wheel, so
this catches compile errors and shared-memory overruns before a GPU is available. It does not run
anything, so it says nothing about correctness (tests) or speed (benchmarks/kernels.py). Each case is
``dtype,E,EV`` (folded q/k width, value width); the tile size is the one :func:`pick_block` picks for
n = 64. TRITON_INTERPRET must not be set. Exits 1 if a kernel fails to compile or needs more shared
memory than ``--smem-limit`` (sm_90: 227 KiB per block).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

CASES = ["bf16,72,32", "bf16,160,128", "fp16,144,64", "fp32,72,32", "fp32,160,128", "bf16,512,512",
         "fp32,512,512"]
_TORCH = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    ints = {"smb", "smh", "smi", "smj", "svb", "svh", "svn", "sob", "soh", "son", "sdb", "sdh", "sdn", "H", "N", "B",
            "BH", "rows_per_group", "E", "EV"}
    floats = {"qk_scale", "scale", "p_drop", "inv_keep"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in ints:
            sig[name] = "i32"
        elif name in floats:
            sig[name] = "fp32"
        else:  # pragma: no cover - a new kernel argument this checker does not know yet
            raise KeyError(f"{fn.__name__}: unknown argument {name}")
    return sig


def compile_case(dtype: str, e: int, ev: int, arch: int, smem_limit: int) -> list[tuple[str, int, float, bool]]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dif_attention.ops import gate_kernel, kernels
    from dif_attention.ops.attention_op import dot_precision, pick_block
    from dif_attention.ops.gate_op import gate_blocks

    target = GPUTarget("cuda", arch, 32)
    blk = pick_block(64, e, ev, getattr(torch, _TORCH[dtype]))
    pw = lambda x: max(16, triton.next_power_of_2(x))  # noqa: E731
    ptrs = {n: f"*{dtype}" for n in ["Q", "K", "V", "Bias", "O", "DO", "DK", "DV", "DQ"]}
    ptrs.update(M="*u8", Len="*i32", Seed="*i64", Lse="*fp32", Delta="*fp32", DBias="*fp32", W1="*fp32",
                B1="*fp32", W2="*fp32", B2="*fp32", Out="*fp32", DE="*fp32", DW1="*fp32", DB1="*fp32",
                DW2="*fp32")
    flags = dict(BE=pw(e), BEV=pw(ev), BLOCK_M=blk, BLOCK_N=blk, CAUSAL=True, HAS_BIAS=True, HAS_LEN=True,
                 HAS_MASK=True, DROPOUT=True, PREC=dot_precision(getattr(torch, _TORCH[dtype])))
    jobs = [(f, flags) for f in (kernels.attention_fwd, kernels.attention_bwd_dkdv, kernels.attention_bwd_dq,
                                 kernels.attention_bwd_dbias)]
    jobs.append((kernels.attention_bwd_delta, dict(BEV=pw(ev), BLOCK_M=blk)))
    gm, gn = gate_blocks(64, e, getattr(torch, _TORCH[dtype]))
    jobs.append((gate_kernel.gate_energy, dict(BE=pw(e), BLOCK_M=gm, BLOCK_N=gn, BLOCK_H=gn, PREC=flags["PREC"])))
    jobs.append((gate_kernel.gate_energy_bwd, dict(BE=pw(min(e, 128)), BL=64, PREC=flags["PREC"])))
    fp32_grads = {**ptrs, "DQ": "*fp32", "DK": "*fp32"}  # the energy backward writes fp32 dq/dk
    out = []
    for fn, cx in jobs:
        cx = {k: v for k, v in cx.items() if k in fn.arg_names}
        sig = _signature(fn, fp32_grads if fn is gate_kernel.gate_energy_bwd else ptrs, cx)
        src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in cx.items()})
        t0 = time.time()
        compiled = triton.compile(src, target=target, options=dict(num_warps=4, num_stages=2))
        smem = compiled.metadata.shared
        out.append((fn.__name__, smem, time.time() - t0, smem <= smem_limit))
    return out, blk


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    p.add_argument("--case", action="append", help="dtype,E,EV (repeatable); default: a set of DIF widths")
    p.add_argument("--smem-limit", type=int, default=232448, help="bytes of shared memory per block")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile")
        return 2
    ok = True
    for case in args.case or CASES:
        dtype, e, ev = case.split(",")
        try:
            rows, blk = compile_case(dtype, int(e), int(ev), args.arch, args.smem_limit)
        except Exception as err:  # report and go on with the other cases
            print(f"{case:<14} FAILED to compile: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            ok = False
            continue
        for name, smem, secs, fits in rows:
            ok &= fits
            print(f"{case:<14} block {blk:<3} {name:<20} shared {smem / 1024:7.1f} KiB "
                  f"{'ok' if fits else 'OVER LIMIT'} ({secs:.1f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
