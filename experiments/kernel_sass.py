"""The Triton kernels' machine code for a GPU target, read on any host (no GPU): per loop, the
instructions one key tile issues, and with the forward's rescale skipped; the tensor cores'
multiply-adds and the elements added to global memory (RED) per program and loop body;
registers, spills and shared memory per program.

  python3 experiments/kernel_sass.py                             # every kernel, sm_90
  python3 experiments/kernel_sass.py --kernels tree band --rescale-slack 0
  python3 experiments/kernel_sass.py --cc 80
  python3 experiments/kernel_sass.py --kernels tree band --tuning band_by_position=1
  python3 experiments/kernel_sass.py --kernels dq dkv dkv_dq    # the backward, both forms

Each default launch of backend="triton" at the Llama-3-8B attention shape (S = 32768, Hq=32,
Hkv=8, D=128, bf16, window 128, sink 1, 128 x 128 blocks) is compiled by triton for the
target and disassembled by the cuobjdump that triton ships. A loop body is the code from a
backward branch's target to the branch. Where a loop holds the forward's skippable rescale
(a `@!P BRA` over in-place multiplies, triton_kernels._lazy_rescale_asm), the skipped path's
count leaves those multiplies out. Counts are static: each instruction once per tile. Run it
where triton is imported compiled (TRITON_INTERPRET unset).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax  # only its dtypes: the kernels compile for a target, no device is used
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import add_tuning_flag, parsed_tuning  # noqa: E402
from pallas_kernels.config import AttentionConfig, GpuTuning  # noqa: E402

SHAPE = dict(seq=32768, hq=32, hkv=8, d=128)
# kernel -> (launch maker in triton_backend, pointer dtypes of its inputs)
KERNELS = {
    "fwd": ("forward_launch", ["*bf16"] * 3 + ["*i32"] * 5),
    "routed": ("routed_forward_launch", ["*bf16"] * 3 + ["*i32"] * 5 + ["*bf16", "*fp32"]),
    "tree": ("segment_forward_launch", ["*bf16"] * 3 + ["*i32"] * 2),
    "band": ("band_forward_launch", ["*bf16"] * 3 + ["*i32", "*bf16", "*fp32"]),
    "dq": ("dq_launch", ["*bf16"] * 4 + ["*fp32"] * 2 + ["*i32"] * 5),
    "dkv": ("dkv_launch", ["*bf16"] * 4 + ["*fp32"] * 2 + ["*i32"] * 5),
    "dkv_sink": ("dkv_sink_launch", ["*bf16"] * 4 + ["*fp32"] * 2 + ["*i32"] * 5),
    "dkv_dq": ("dkv_dq_launch", ["*bf16"] * 4 + ["*fp32"] * 2 + ["*i32"] * 5),
}
_POINTER = {"bfloat16": "*bf16", "float32": "*fp32", "int32": "*i32"}


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(launch, dtypes: list[str], cc: int):
    """A Launch compiled by triton for compute capability cc; dtypes: one per pointer
    argument, outputs included. Every pointer is taken 16-byte aligned, as jax_triton does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = dict(zip(launch.kernel.arg_names, dtypes)) | {m: "constexpr"
                                                              for m in launch.meta}
    source = ASTSource(launch.kernel, signature, constexprs=dict(launch.meta),
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(len(dtypes))})
    return triton.compile(source, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))


def compile_kernel(kernel: str, cc: int, tuning: GpuTuning):
    """(launch, compiled triton kernel) of one default launch for compute capability cc."""
    from pallas_kernels import triton_backend as tb
    s, hq, hkv, d = (SHAPE[n] for n in ("seq", "hq", "hkv", "d"))
    cfg = AttentionConfig(q_len=s, kv_len=s, q_offset=0, window=128, sink_tokens=1,
                          scale=d ** -0.5, block_q=128, block_k=128, gpu=tuning)
    maker, inputs = KERNELS[kernel]
    host = tb.compute_capability
    tb.compute_capability = lambda: cc // 10  # the launch for that target, not this host
    try:
        launch = getattr(tb, maker)(cfg, (1, s, hq, d), (1, s, hkv, d), jnp.bfloat16)
    finally:
        tb.compute_capability = host
    outputs = [_POINTER[jnp.dtype(o.dtype).name] for o in launch.out_shapes]
    return launch, compile_launch(launch, inputs + outputs, cc)


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout


def ptxas_usage(ptx: str, cc: int) -> dict:
    """Registers per thread and spilled bytes, as ptxas reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        log = subprocess.run([_tool("ptxas"), f"-arch={arch}", "-v", path, "-o",
                              os.path.join(tmp, "out.cubin")], capture_output=True,
                             text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spill.group(1)) if spill else 0)


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction without predicate comments) in program order."""
    found = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            found.append((int(m.group(1), 16), m.group(2).strip()))
    return found


def skipped_multiplies(sass: str) -> list[tuple[set, set, int]]:
    """Each block of in-place multiplies behind a `@!P BRA`: (the registers the branch's
    predicate compares with 1.0, the registers the multiplies scale by, their number)."""
    lines = [text for _, text in instructions(sass)]
    blocks = []
    for i, line in enumerate(lines):
        branch = re.match(r"@!(P\d) BRA", line)
        if not branch:
            continue
        factors = []
        for after in lines[i + 1:]:  # FMUL Rd, Rd, Ra (sm_90) or FMUL Rd, Ra, Rd (sm_80)
            mul = re.match(r"FMUL (R\d+), (R\d+)(?:\.reuse)?, (R\d+)(?:\.reuse)?$", after)
            if not mul or mul.group(1) not in mul.group(2, 3):
                break
            factors.append(mul.group(3) if mul.group(1) == mul.group(2) else mul.group(2))
        if not factors:
            continue
        pred, tested = branch.group(1), set()
        for before in lines[max(0, i - 150):i]:
            test = re.match(rf"FSETP\.NEU\.(AND|OR) {pred}, PT, (R\d+), 1, (PT|{pred})$", before)
            if test:
                tested.add(test.group(2))
        blocks.append((tested, set(factors), len(factors)))
    return blocks


def _warp_macs(opcode: str) -> int:
    """Multiply-adds one warp's share of a tensor-core instruction does: HGMMA.MxNxK is issued
    by the 4 warps of a warpgroup together, HMMA.MNK (16816: 16 x 8 x 16) by one warp."""
    if m := re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode):
        return int(m[1]) * int(m[2]) * int(m[3]) // 4
    if m := re.match(r"HMMA\.(16)(8)(8|16)\b", opcode):
        return int(m[1]) * int(m[2]) * int(m[3])
    return 0


def _warp_reduced(opcode: str) -> int:
    """Elements one warp adds to global memory with a RED instruction: REDG.E.ADD.F32x4
    (sm_90) adds 4 per thread, RED.E.ADD.F32 (sm_80) one."""
    if not re.match(r"REDG?\.", opcode):
        return 0
    width = re.search(r"\.[A-Z]+\d+x(\d+)\b", opcode)
    return 32 * (int(width[1]) if width else 1)


def loops(sass: str) -> list[dict]:
    """Each loop body (a backward branch and its target): instruction count, the count with
    its skippable multiplies left out, and the most frequent opcodes."""
    code = instructions(sass)
    index = {address: i for i, (address, _) in enumerate(code)}
    found = []
    for i, (address, text) in enumerate(code):
        branch = re.search(r"BRA (0x[0-9a-f]+)", text)
        if not branch or int(branch.group(1), 16) >= address:
            continue
        body = code[index[int(branch.group(1), 16)]:i + 1]
        body_sass = "\n".join(f"        /*{a:04x}*/ {t} ;" for a, t in body)
        skipped = sum(count for _, _, count in skipped_multiplies(body_sass))
        names = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in body]
        opcodes = collections.Counter(name.split(".")[0] for name in names)
        found.append(dict(start=body[0][0], end=address, instructions=len(body),
                          rescale_skipped=len(body) - skipped,
                          warp_macs=sum(map(_warp_macs, names)),
                          warp_reduced=sum(map(_warp_reduced, names)),
                          top=", ".join(f"{op} {n}" for op, n in opcodes.most_common(6))))
    return found


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", choices=tuple(KERNELS), default=list(KERNELS))
    parser.add_argument("--cc", type=int, default=90, help="compute capability, e.g. 90, 80")
    parser.add_argument("--rescale-slack", type=int, default=None,
                        help="GpuTuning.rescale_slack (default: its own)")
    add_tuning_flag(parser, "other GpuTuning fields, e.g. band_by_position=1 band_tile_k=32")
    parser.add_argument("--out", default="", help="JSON of the rows")
    args = parser.parse_args(argv)
    changes = {} if args.rescale_slack is None else {"rescale_slack": args.rescale_slack}
    changes.update(parsed_tuning(parser, args.tuning))
    try:
        tuning = GpuTuning(**changes)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    rows = []
    for kernel in args.kernels:
        launch, compiled = compile_kernel(kernel, args.cc, tuning)
        usage = ptxas_usage(compiled.asm["ptx"], args.cc)
        for n, loop in enumerate(loops(disassemble(compiled.asm["cubin"]))):
            rows.append(dict(kernel=kernel, loop=n, warps=launch.num_warps,
                             stages=launch.num_stages, shared=compiled.metadata.shared,
                             pack=launch.meta.get("PACK", 0), **usage, **loop))
            rows[-1].update(macs=loop["warp_macs"] * launch.num_warps,
                            reduced=loop["warp_reduced"] * launch.num_warps)
            print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\nsm_{args.cc}, jax {jax.__version__}; per loop body (one key tile), static counts")
    print("| kernel | loop | instructions | rescale skipped | registers | spill B | shared B "
          "| tensor-core MACs | RED elements | top opcodes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['loop']} | {r['instructions']} | {r['rescale_skipped']} | "
              f"{r['registers']} | {r['spill_bytes']} | {r['shared']} | {r['macs']} | "
              f"{r['reduced']} | {r['top']} |")
    return rows


if __name__ == "__main__":
    main()
