"""Where a compiled function's device time goes: a jax.profiler trace of a few calls, read
back from its Perfetto (Chrome trace event) JSON and summed per kernel and per kind of kernel.

  summary = profile(fn, *args, reps=3)      # {"kernels_per_call", "busy_ms_per_call", ...}

On a GPU the trace holds one process per device ("/device:GPU:0") whose "Stream #..." threads
carry the kernels as complete ("X") events, named by the kernel (cuDNN's, cuBLAS's, XLA's
fusions, Triton's and Pallas' kernel functions). Those events are what is summed; the derived
lines ("XLA Ops", "XLA Modules", "Steps") repeat the same time under other names and are left
out. Without a device process (the CPU backend) the summary says so and holds no numbers.

Kinds, by the kernel's name (first match): this project's kernels (Pallas, Triton: "custom
kernels"), cudnn attention, gemm (cuBLAS, cuBLASLt, CUTLASS,
XLA's Triton GEMMs), sort (CUB's radix sort, XLA's sort), copy (memcpy, memset), xla fusion
(XLA's generated kernels) and, for the rest, custom kernels (Pallas, Triton, jax-triton).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile

import jax

CUSTOM = "custom kernels"
KINDS = (
    # This project's kernels first, by their names, whatever words they hold ("sorted", "dot").
    (CUSTOM, re.compile(r"^(block_sparse_attention|routed_attention|block_schedule|fwd_|dq_"
                        r"|dkv_|compact_kernel|decode_kernel)")),
    ("cudnn attention", re.compile(r"cudnn|sdpa|fmha|flash_fprop|flash_bprop")),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|_dot_|^dot|matmul")),
    ("sort", re.compile(r"sort|radix|cub::")),
    ("copy", re.compile(r"memcpy|memset")),
    ("xla fusion", re.compile(r"fusion|^wrapped_|^loop_|^input_|^copy|^transpose|^concatenate"
                              r"|^dynamic|^slice|^gather|^scatter|^iota|^reduce|^select")),
)
DEVICE = re.compile(r"^/device:(GPU|TPU)")


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if pattern.search(lowered):
            return kind
    return CUSTOM


def device_kernel_events(trace: dict) -> list[dict]:
    """The complete events on the kernel threads ("Stream ...") of the device processes."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and DEVICE.match(str(e.get("args", {}).get("name", "")))}
    streams = {(e["pid"], e["tid"]) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in devices
               and str(e.get("args", {}).get("name", "")).startswith("Stream")}
    return [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams]


def busy_us(events: list[dict]) -> float:
    """The length of the union of the events' [ts, ts + dur) intervals (microseconds)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(trace: dict, calls: int, top: int = 12) -> dict:
    """Per call (the trace covers `calls` calls): kernel launches, the device's busy time, the
    time per kind and the `top` kernels by time (name, kind, ms, launches)."""
    events = device_kernel_events(trace)
    if not events:
        return {"calls": calls, "kernels_per_call": None,
                "note": "no device kernel events in the trace (no GPU process: the CPU backend)"}
    by_kind, by_name = {}, {}
    for e in events:
        ms = e["dur"] / 1e3
        kind = kind_of(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        entry = by_name.setdefault(e["name"], [kind, 0.0, 0])
        entry[1] += ms
        entry[2] += 1
    kernels = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return {
        "calls": calls,
        "kernels_per_call": len(events) / calls,
        "busy_ms_per_call": busy_us(events) / 1e3 / calls,
        "kernel_ms_per_call": sum(by_kind.values()) / calls,
        "kinds_ms_per_call": {k: v / calls for k, v in sorted(by_kind.items(),
                                                              key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:120], "kind": kind, "ms_per_call": ms / calls,
                         "launches_per_call": n / calls}
                        for name, (kind, ms, n) in kernels],
    }


def load_trace(log_dir: str) -> dict:
    paths = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}/plugins/profile")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        return json.load(f)


def profile(fn, *args, reps: int = 3) -> dict:
    """summarize() of `reps` calls of fn(*args), traced after one warm-up call."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        return summarize(load_trace(log_dir), reps)


def format_summary(label: str, summary: dict) -> str:
    if summary.get("kernels_per_call") is None:
        return f"{label}: {summary['note']}"
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in summary["kinds_ms_per_call"].items())
    lines = [f"{label}: {summary['kernels_per_call']:.0f} kernels, busy "
             f"{summary['busy_ms_per_call']:.3f} ms per call; ms per kind: {kinds}"]
    lines += [f"    {k['ms_per_call']:8.3f} ms  x{k['launches_per_call']:<5.0f} {k['kind']:16s} "
              f"{k['name']}" for k in summary["top_kernels"]]
    return "\n".join(lines)
