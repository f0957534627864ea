"""A trained surgery run's own routes on real text: block densities, routed_attention per layer
and the whole model's prefill, against cuDNN and the dense model, in one run.

  python3 experiments/bench_model_routes.py RUN_DIR --seq-lens 2048,4096,8192 [--text PATH]
  python3 experiments/bench_model_routes.py --routes OUT/model_routes.json --backends gpu,triton
  python3 experiments/bench_model_routes.py --toy          # CPU: a tiny random run built here

RUN_DIR is a run's --workdir (or its checkpoints/ directory); the model is restored from its
newest checkpoint (restore_run). The text is --text (a UTF-8 file) or, by default, the run's
own held-out documents; its first S tokens (BOS first) are routed by the model (extract_routes
on the masked dense evaluation path: the hard evaluation routes of every layer). For every
length S:

  - per layer: the share of causal 128 x 128 blocks the kernels visit in token order (the
    natural schedule) and on the cluster-sorted layout (tree segments + band), and the share of
    causal token pairs allowed;
  - per layer: routed_attention (layouts auto, sorted, natural; on every backend of
    --backends) forward and forward + backward on those routes, q, k, v random bf16 at the
    model's attention shape, against cuDNN causal attention on the same q, k, v
    (backward = (f+b) - f);
  - the whole model's prefill (logits of all S positions, routers included): the surgical
    model through the kernels (set_attention_impl(model, "kernel"), layout auto, every backend)
    against the same model in base mode (dense causal softmax in XLA, routers unused) and
    against the base model with its attention through cuDNN (cast to bf16 when the model
    computes in float32);
    plus, at the first S, the surgical kernel logits against the surgical masked dense ones;
    with --profile N, a trace of N calls of each of those prefills says where the device time
    goes (kernels, launches, time per kind of kernel: experiments/trace_summary.py).

Times are medians after warm-up (routes and inputs are arguments of the compiled functions).
The router's tree is sized for surgery.max_len: a length above it is run and flagged (its
routes are outside what the run trained). The routes of every length come first, then the
parts of --parts in their order (by default the whole model at every length, then attention per
layer); what is left once --budget-s has passed is skipped with a note (--parts, --layouts and
--backends trim it beforehand). Writes the routes (.npz) once extracted and the JSON after
every part to --out, and prints the tables last. --routes takes an earlier result's routes
instead of a run (no model, no extraction), for attention timings on a machine without the
model.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import trace_summary  # noqa: E402
from bench_attention import timed  # noqa: E402
from pallas_kernels import (band_schedule, build_schedule, routed_attention,  # noqa: E402
                            segment_schedule)
from pallas_kernels.routed import prefer_sorted  # noqa: E402
from pallas_kernels.schedule import natural_density_bound  # noqa: E402
from pallas_kernels.sorted_layout import band_sink_tokens, sort_by_cluster  # noqa: E402
from ultrametric_jax.model import llama  # noqa: E402
from ultrametric_jax.surgery.inject import (base_model_mode, extract_routes,  # noqa: E402
                                            set_attention_impl)
from ultrametric_jax.surgery.router import RouterParam  # noqa: E402

LAYOUTS = ("auto", "sorted", "natural")
BACKENDS = ("gpu", "triton", "mosaic")
DEFAULT_BACKEND = "gpu"
PARTS = ("model", "attention")
TINY_CONFIG = ROOT / "configs" / "tiny_random.py"


# ----------------------------------------------------------------------------- inputs

def checkpoints_of(run_dir: str) -> str:
    """The checkpoints directory of a run's workdir, or run_dir itself when it is one."""
    # The run stack (data, checkpoints, GGUF) is imported where a run is read, so that --routes
    # runs with the kernels' packages alone.
    from ultrametric_jax.run.export import checkpoint_dir_of
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return checkpoint_dir_of(workdir=run_dir)[0]
    return checkpoint_dir_of(checkpoint=run_dir)[0]


def text_tokens(restored, text_path, length):
    """int32 [length]: BOS then the text's tokens (--text) or the run's held-out documents."""
    from ultrametric_jax.run.data import corpus_tokenizer, pack_documents
    from ultrametric_jax.run.data_corpus import load_corpus, split_documents
    tok = corpus_tokenizer(restored.base_model["path"], restored.model.config)
    if text_path:
        ids = [tok.bos_id] + tok.encode_batch([Path(text_path).read_text(encoding="utf-8")])[0]
        source = text_path
    else:
        data = restored.run.data
        docs = load_corpus(data.corpus, max_chars=data.max_chars, chunk_chars=data.chunk_chars)
        packed = pack_documents(split_documents(docs, data.val_fraction)[1], tok, length)
        ids = packed.tokens[0][packed.mask[0]].tolist()
        source = f"held-out documents of {data.corpus!r}"
    if len(ids) < length:
        raise SystemExit(f"the text ({source}) holds {len(ids)} tokens; --seq-lens needs "
                         f"{length}: give a longer --text")
    return np.asarray(ids[:length], np.int32), source


# ----------------------------------------------------------------------------- densities

def block_densities(ids, *, window, sink, block):
    """Per layer of ids [layers, H, S]: (natural, sorted) visited / causal blocks, numpy."""
    layers, heads, seq = ids.shape
    nq = -(-seq // block)
    causal = heads * nq * (nq + 1) // 2        # query block i holds causal pairs in i + 1

    @jax.jit
    def counts(ids):
        natural = build_schedule(ids, ids, window=window, sink_tokens=sink, block_q=block,
                                 block_k=block)
        _, sorted_ids, _ = sort_by_cluster(ids)
        tree = segment_schedule(sorted_ids, block_q=block, block_k=block)
        band_sink = band_sink_tokens(sink)  # narrower sinks run as a jnp partial
        band = band_schedule(layers, heads, seq, window=window, sink_tokens=band_sink,
                             block_q=block, block_k=block)
        total = lambda s: jnp.sum(s.kv_num_blocks, axis=(1, 2))  # noqa: E731
        band_total = total(band) if (window > 0 or band_sink > 0) else 0
        return total(natural), total(tree) + band_total

    natural, sorted_ = (np.asarray(x, np.float64) / causal for x in counts(ids))
    return natural, sorted_


# ----------------------------------------------------------------------------- attention

def variant_key(layout, backend):
    """The JSON key of one timed variant: the layout alone for the default backend."""
    return layout if backend == DEFAULT_BACKEND else f"{layout}:{backend}"


def attention_timings(ids, shape, *, layouts, backends, window, sink, block, reps, smoke,
                      deadline, notes, label):
    """{variant_key: [per layer {fwd_ms, fwd_bwd_ms}]} for every (backend, layout), and cuDNN's
    {fwd_ms, fwd_bwd_ms}, for ids [layers, 1, H, S] on random bf16 q, k, v."""
    layers, _, heads, seq = ids.shape
    ids = jnp.asarray(ids)           # on the device once, not at every timed call
    keys = jax.random.split(jax.random.PRNGKey(seq), 4)
    q = jax.random.normal(keys[0], (1, seq, heads, shape["d"]), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, seq, shape["hkv"], shape["d"]), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, seq, shape["hkv"], shape["d"]), jnp.bfloat16)
    ct = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

    def both(fn):
        def fwd_bwd(q, k, v, ct, ids):
            _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ids), q, k, v)
            return vjp(ct)
        return jax.jit(fn), jax.jit(fwd_bwd)

    def measure(fns, ids):
        f, fb = fns
        return dict(fwd_ms=1e3 * timed(f, q, k, v, ids, reps=reps, min_batch_s=0.01),
                    fwd_bwd_ms=1e3 * timed(fb, q, k, v, ct, ids, reps=reps, min_batch_s=0.01))

    impl = "xla" if smoke else "cudnn"
    cudnn = measure(both(lambda q, k, v, ids: jax.nn.dot_product_attention(
        q, k, v, implementation=impl, is_causal=True)), ids[0])
    out = {}
    for backend in backends:
        for layout in layouts:
            fns = both(lambda q, k, v, ids, layout=layout, backend=backend: routed_attention(
                q, k, v, ids, window=window, sink_tokens=sink, layout=layout, backend=backend,
                interpret=smoke, block_q=block, block_k=block))
            key, rows = variant_key(layout, backend), []
            for layer in range(layers):
                if time.perf_counter() > deadline:
                    notes.append(f"{label} {key}: layers {layer}..{layers - 1} not timed, the "
                                 "time budget is spent")
                    break
                rows.append(measure(fns, ids[layer]))
            out[key] = rows
    return out, cudnn


# ----------------------------------------------------------------------------- whole model

class CudnnAttention(nnx.Module):
    """The base layer's causal attention through jax.nn.dot_product_attention (cuDNN on a GPU),
    with the surgical layer's own q/k/v/o projections; float32 q, k, v go in as bf16."""

    def __init__(self, layer, implementation):
        self.config, self.scale, self.implementation = layer.config, layer.scale, implementation
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj)

    def __call__(self, x, positions, attention_mask=None, cache=None):
        if positions is None:
            positions = llama.default_positions(x)
        q, k, v = llama.project_qkv(self.config, self.q_proj, self.k_proj, self.v_proj, x,
                                    positions)
        dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
        out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                           scale=self.scale, is_causal=True,
                                           implementation=self.implementation)
        return self.o_proj(out.astype(q.dtype).reshape(*out.shape[:2], -1))


def _compiled_prefill(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)), state


def model_prefills(model, tokens, *, backends, kernel_options, smoke, reps, check,
                   profile_reps=0):
    """({mode: ms}, checks, {mode: trace summary}) of the whole model's forward on tokens
    [1, S], the surgical model through the kernels of every backend ("surgical_kernel" for the
    default one, "surgical_kernel:<name>" for the others); with check, the logits' relative
    differences (each backend's kernel path vs the masked dense surgical path; cuDNN base vs
    XLA base); with profile_reps, every timed mode's device time per kernel and kind over that
    many traced calls (trace_summary)."""
    times, logits, profiles = {}, {}, {}

    def run(mode, time_it=True):
        fn, state = _compiled_prefill(model)
        if time_it:
            times[mode] = 1e3 * timed(fn, state, tokens, reps=reps)
            if profile_reps:
                profiles[mode] = trace_summary.profile(fn, state, tokens, reps=profile_reps)
        if check:
            logits[mode] = fn(state, tokens)

    def rel(a, b):      # on the device: the logits are S x vocabulary float32
        return float(jnp.max(jnp.abs(logits[a] - logits[b]))
                     / jnp.maximum(1.0, jnp.max(jnp.abs(logits[b]))))

    kernel_modes = {}
    for backend in backends:
        mode = "surgical_kernel" + ("" if backend == DEFAULT_BACKEND else f":{backend}")
        set_attention_impl(model, "kernel", backend=backend, **kernel_options)
        run(mode)
        kernel_modes[backend] = mode
    if check:
        set_attention_impl(model, "dense")
        run("surgical_dense", time_it=False)
    with base_model_mode(model):
        run("dense_base")
    layers = model.model.layers
    surgical = [layer.self_attn for layer in layers]
    try:
        for layer, attn in zip(layers, surgical):
            layer.self_attn = CudnnAttention(attn, "xla" if smoke else "cudnn")
        run("dense_base_cudnn")
    finally:
        for layer, attn in zip(layers, surgical):
            layer.self_attn = attn
    set_attention_impl(model, "kernel", backend=backends[0], **kernel_options)
    checks = {}
    if check:
        checks = {("kernel_vs_masked_dense" if b == DEFAULT_BACKEND
                   else f"kernel_vs_masked_dense:{b}"): rel(mode, "surgical_dense")
                  for b, mode in kernel_modes.items()}
        checks["cudnn_vs_xla_base"] = rel("dense_base_cudnn", "dense_base")
    return times, checks, profiles


# ----------------------------------------------------------------------------- toy run

def build_toy_run(root: str) -> str:
    """A tiny random Llama (configs/tiny_random.py) trained for 2 steps; its workdir."""
    from ultrametric_jax.cli import train
    base = runpy.run_path(str(TINY_CONFIG))["write_model"](os.path.join(root, "base"))
    workdir = os.path.join(root, "run")
    rc = train.main(["--config", str(TINY_CONFIG), f"--config.model.path={base}",
                     "--workdir", workdir, "--config.train.steps=2",
                     "--config.checkpoint.every=2", "--config.surgery.max_len=32"])
    if rc != 0:
        raise SystemExit(f"the toy training run failed (exit status {rc})")
    return workdir


def perturb_routers(model, seed=0):
    """Random router weights (toy only): two training steps leave the routes collapsed."""
    state = nnx.state(model, RouterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        x + 2.0 * jax.random.normal(key, x.shape, x.dtype) for x, key in zip(leaves, keys)]))


# ----------------------------------------------------------------------------- driver

def route_entry(model, tokens, seq, surgery, block, notes):
    """{seq, exceeds_max_len, layers: [densities], clusters [layers, 1, H, S]} of the model's
    evaluation routes on the first seq tokens."""
    label, c = f"S={seq}", model.config
    over = seq > surgery.max_len
    if over:
        note = (f"{label} exceeds the run's surgery.max_len={surgery.max_len}: the router's "
                f"tree (L={surgery.num_levels}) needs max_len >= S; these routes lie outside "
                "what the run trained")
        print("NOTE: " + note, flush=True)
        notes.append(note)
    if seq > c.max_position_embeddings:
        notes.append(f"{label} exceeds the model's max_position_embeddings="
                     f"{c.max_position_embeddings}")
    set_attention_impl(model, "dense")   # the evaluation path; compiles faster than kernels
    routes = extract_routes(model, jnp.asarray(tokens[None, :seq]))
    clusters = np.asarray(routes.cluster_ids)                 # [layers, 1, H, S]
    natural, sorted_ = block_densities(jnp.asarray(clusters[:, 0]), window=surgery.window,
                                       sink=surgery.sink_tokens, block=block)
    layers = [dict(layer=i, natural_density=float(natural[i]), sorted_density=float(sorted_[i]),
                   auto_runs_sorted=bool(prefer_sorted(natural_density_bound(
                       jnp.asarray(clusters[i]), window=surgery.window,
                       sink_tokens=surgery.sink_tokens, block_q=block, block_k=block))),
                   pair_density=float(routes.density_per_layer[i]),
                   tree_pair_density=float(routes.tree_density_per_layer[i]))
              for i in range(c.num_hidden_layers)]
    return dict(seq=seq, exceeds_max_len=over, layers=layers, clusters=clusters)


def layer_means(rows):
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} if rows else None


def fresh_routes(args, result):
    """Restores the run and extracts its routes at every length: (model, entries, routes_npz,
    tokens, shape); fills result's description of the run."""
    from ultrametric_jax.run.pipeline import restore_run
    start = time.perf_counter()
    restored = restore_run(checkpoints_of(args.run_dir))
    if args.toy:
        perturb_routers(restored.model)
    model, surgery, c = restored.model, restored.surgery, restored.model.config
    shape = dict(hq=c.num_attention_heads, hkv=c.num_key_value_heads, d=c.head_dim)
    tokens, source = text_tokens(restored, args.text, max(args.seq_lens))
    result.update({
        "run_dir": os.path.abspath(args.run_dir), "step": restored.step,
        "model": dict(layers=c.num_hidden_layers, Hq=shape["hq"], Hkv=shape["hkv"],
                      D=shape["d"], dtype=jnp.dtype(model.dtype).name,
                      max_position_embeddings=c.max_position_embeddings),
        "surgery": dict(max_len=surgery.max_len, arity=surgery.arity,
                        levels=surgery.num_levels, d_max=surgery.max_distance,
                        clusters_at_most=surgery.arity ** surgery.cut_level,
                        window=surgery.window, sink=surgery.sink_tokens),
        "text": source})
    print(f"jax {jax.__version__} on {result['device']}; run {args.run_dir} step "
          f"{restored.step}; text: {source}", flush=True)
    result["elapsed_s"]["restore"] = time.perf_counter() - start
    entries, routes_npz = [], {}
    for seq in args.seq_lens:
        entries.append(route_entry(model, tokens, seq, surgery, args.block, result["notes"]))
        routes_npz[f"S{seq}"] = entries[-1].pop("clusters")
        result["elapsed_s"][f"routes S={seq}"] = time.perf_counter() - start
        print(f"S={seq}: routes extracted, blocks visited natural "
              f"{np.mean([r['natural_density'] for r in entries[-1]['layers']]):.1%}, sorted "
              f"{np.mean([r['sorted_density'] for r in entries[-1]['layers']]):.1%}", flush=True)
    return model, entries, routes_npz, tokens, shape


TIMING_KEYS = ("model_ms", "checks", "cudnn", "mean")


def saved_routes(args, result):
    """The routes and densities of an earlier run of this script (--routes JSON and the .npz
    beside it), for the lengths asked (all when --seq-lens is not given): (entries,
    routes_npz, shape); its timings are dropped."""
    path = Path(args.routes)
    npz_path = path.with_suffix(".routes.npz")
    if not path.is_file() or not npz_path.is_file():
        raise SystemExit(f"--routes needs an earlier result JSON and its routes beside it: "
                         f"{path} and {npz_path} (both must exist)")
    earlier = json.loads(path.read_text())
    npz = np.load(npz_path)
    by_seq = {e["seq"]: e for e in earlier["seqs"]}
    seqs = args.seq_lens or sorted(by_seq)
    missing = [s for s in seqs if s not in by_seq or f"S{s}" not in npz]
    if missing:
        raise SystemExit(f"{path} holds the routes of S={sorted(by_seq)}, not of S={missing}")
    args.seq_lens = seqs
    for key in ("run_dir", "step", "model", "surgery", "text"):
        result[key] = earlier[key]
    result["routes_from"] = str(path)
    print(f"jax {jax.__version__} on {result['device']}; routes of {earlier['run_dir']} (step "
          f"{earlier['step']}) from {path}", flush=True)
    entries = []
    for seq in seqs:
        entry = {k: v for k, v in by_seq[seq].items() if k not in TIMING_KEYS}
        entry["layers"] = [{k: v for k, v in row.items() if not isinstance(v, dict)}
                           for row in entry["layers"]]
        entries.append(entry)
    m = result["model"]
    return entries, {f"S{s}": npz[f"S{s}"] for s in seqs}, dict(hq=m["Hq"], hkv=m["Hkv"],
                                                                   d=m["D"])


def finish_means(entries):
    """entry["mean"]: the layer means of the densities and of every timed variant."""
    for entry in entries:
        layers = entry["layers"]
        entry["mean"] = layer_means([{k: v for k, v in r.items() if isinstance(v, float)}
                                     for r in layers])
        for key in variants_of(layers):
            entry["mean"][key] = layer_means([r[key] for r in layers if key in r])


def save(result, entries, out):
    finish_means(entries)
    result["seqs"] = entries
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")        # a call cut short leaves the last whole file
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)


def run(args):
    start = time.perf_counter()
    deadline = start + args.budget_s
    block = args.block
    # Without a GPU (the toy, or saved routes timed on a CPU) the kernels are interpreted and
    # XLA attention stands in for cuDNN.
    smoke = args.toy or jax.default_backend() != "gpu"
    result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "block": block,
              "backends": args.backends, "seqs": [], "notes": [], "elapsed_s": {},
              "cudnn_stands_in": "XLA attention (no GPU: kernels interpreted)" if smoke
              else None}
    elapsed = result["elapsed_s"]
    if args.routes:
        entries, routes_npz, shape = saved_routes(args, result)
        model = tokens = None
    else:
        model, entries, routes_npz, tokens, shape = fresh_routes(args, result)
    window, sink = result["surgery"]["window"], result["surgery"]["sink"]
    out = Path(args.out)
    out = out if out.suffix == ".json" else out / ("toy.json" if args.toy else "model_routes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out.with_suffix(".routes.npz"), **routes_npz)    # they do not change
    save(result, entries, out)
    kernel_options = dict(interpret=smoke, block_q=block, block_k=block)
    # The parts in the order asked: what the budget cuts is the last.
    for part in args.parts:
        for index, entry in enumerate(entries):
            label = f"S={entry['seq']}"
            if time.perf_counter() > deadline:
                result["notes"].append(f"{label}: {'whole model' if part == 'model' else part} "
                                       "not timed, the time budget is spent")
                continue
            if part == "model":
                ids = jnp.asarray(tokens[None, :entry["seq"]])
                entry["model_ms"], entry["checks"], profiles = model_prefills(
                    model, ids, backends=args.backends, kernel_options=kernel_options,
                    smoke=smoke, reps=args.model_reps, check=index == 0,
                    profile_reps=args.profile)
                print(f"{label}: whole model (ms) {entry['model_ms']} {entry['checks']}",
                      flush=True)
                if profiles:
                    entry["model_profile"] = profiles
                    for mode, summary in profiles.items():
                        print(trace_summary.format_summary(f"{label} {mode}", summary),
                              flush=True)
            else:
                times, entry["cudnn"] = attention_timings(
                    routes_npz[f"S{entry['seq']}"], shape, layouts=args.layouts,
                    backends=args.backends, window=window, sink=sink, block=block,
                    reps=args.reps, smoke=smoke, deadline=deadline, notes=result["notes"],
                    label=label)
                for key, rows in times.items():
                    for row, t in zip(entry["layers"], rows):
                        row[key] = t
                print_seq(entry)
            elapsed[f"{part} {label}"] = time.perf_counter() - start
            save(result, entries, out)
    save(result, entries, out)
    print(f"wrote {out}, {out.with_suffix('.routes.npz')}")
    print_tables(result)
    return result


# ----------------------------------------------------------------------------- tables

def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def variants_of(layers):
    """The timed variants' keys in the order they were timed."""
    return list(dict.fromkeys(k for r in layers for k, v in r.items() if isinstance(v, dict)))


def print_seq(entry):
    """Per-layer table of one length."""
    keys = variants_of(entry["layers"])
    print(f"\nS={entry['seq']} per layer (blocks: visited / causal 128-blocks; ms: "
          "routed_attention bf16 random q, k, v on the layer's routes; layout or "
          "layout:backend)")
    print("| layer | natural blocks | sorted blocks | pairs | auto | "
          + " | ".join(f"{k} fwd" for k in keys) + " | "
          + " | ".join(f"{k} f+b" for k in keys) + " |")
    print("|" + "---|" * (5 + 2 * len(keys)))
    for r in entry["layers"]:
        print(f"| {r['layer']} | {r['natural_density']:.1%} | {r['sorted_density']:.1%} | "
              f"{r['pair_density']:.1%} | {'sorted' if r['auto_runs_sorted'] else 'natural'} | "
              + " | ".join(_fmt(r.get(k, {}).get("fwd_ms")) for k in keys) + " | "
              + " | ".join(_fmt(r.get(k, {}).get("fwd_bwd_ms")) for k in keys) + " |",
              flush=True)


def print_tables(result):
    m, s = result["model"], result["surgery"]
    print(f"\nLearned routes of {result['run_dir']} (step {result['step']}): {m['layers']} "
          f"layers, Hq={m['Hq']} Hkv={m['Hkv']} D={m['D']}, model {m['dtype']}; p={s['arity']} "
          f"L={s['levels']} d_max={s['d_max']} (<= {s['clusters_at_most']} clusters), window "
          f"{s['window']}, sink {s['sink']}, surgery.max_len {s['max_len']}; text: "
          f"{result['text']}; on {result['device']}.")
    print("\nRoutes, mean over layers (blocks visited / causal 128-blocks):\n")
    print("| S | > max_len | natural blocks | sorted blocks | pairs | layers auto->sorted |")
    print("|---|---|---|---|---|---|")
    for e in result["seqs"]:
        mean = e["mean"]
        n_sorted = sum(r["auto_runs_sorted"] for r in e["layers"])
        print(f"| {e['seq']} | {'YES' if e['exceeds_max_len'] else 'no'} | "
              f"{mean['natural_density']:.1%} | {mean['sorted_density']:.1%} | "
              f"{mean['pair_density']:.1%} | {n_sorted}/{len(e['layers'])} |")
    print("\nAttention, mean over layers (ms; routed_attention, layout or layout:backend, and "
          "cuDNN causal on the same random bf16 q, k, v; x = cuDNN / routed):\n")
    print("| S | variant | fwd | cuDNN fwd | x | fwd+bwd | cuDNN fwd+bwd | x | bwd | cuDNN bwd "
          "| x |")
    print("|" + "---|" * 11)
    for e in result["seqs"]:
        cud = e.get("cudnn")
        for key in variants_of(e["layers"]):
            t = e["mean"][key]
            bwd = t["fwd_bwd_ms"] - t["fwd_ms"]
            cbwd = cud and cud["fwd_bwd_ms"] - cud["fwd_ms"]
            x = lambda a, b: None if not a or not b else a / b  # noqa: E731
            print(f"| {e['seq']} | {key} | {_fmt(t['fwd_ms'])} | {_fmt(cud and cud['fwd_ms'])} | "
                  f"{_fmt(x(cud and cud['fwd_ms'], t['fwd_ms']), '.2f')} | "
                  f"{_fmt(t['fwd_bwd_ms'])} | {_fmt(cud and cud['fwd_bwd_ms'])} | "
                  f"{_fmt(x(cud and cud['fwd_bwd_ms'], t['fwd_bwd_ms']), '.2f')} | "
                  f"{_fmt(bwd)} | {_fmt(cbwd)} | {_fmt(x(cbwd, bwd), '.2f')} |")
    base = ("dense base, cuDNN attention" + (" (bf16 attention)" if m["dtype"] == "float32"
                                               else ""))
    print(f"\nWhole-model prefill (ms, logits of every position; surgical = routers + "
          f"routed_attention layout auto, per backend; dense base = the same model in base "
          f"mode, XLA softmax attention; {base}; x = baseline / surgical):\n")
    print("| S | surgical kernel (backend) | ms | dense base (XLA) | x | dense base (cuDNN) | x | "
          "kernel vs masked dense logits |")
    print("|---|---|---|---|---|---|---|---|")
    for e in result["seqs"]:
        t = e.get("model_ms")
        if not t:
            continue
        for mode in (k for k in t if k.startswith("surgical_kernel")):
            backend = mode.partition(":")[2] or DEFAULT_BACKEND
            suffix = mode[len("surgical_kernel"):]
            chk = e.get("checks", {}).get("kernel_vs_masked_dense" + suffix)
            print(f"| {e['seq']} | {backend} | {t[mode]:.2f} | {t['dense_base']:.2f} | "
                  f"{t['dense_base'] / t[mode]:.2f} | {t['dense_base_cudnn']:.2f} | "
                  f"{t['dense_base_cudnn'] / t[mode]:.2f} | {_fmt(chk, '.1e')} |")
    if result.get("cudnn_stands_in"):
        print(f"(every cuDNN column is {result['cudnn_stands_in']} in this run)")
    for note in result["notes"]:
        print("NOTE: " + note)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a surgery run's --workdir")
    parser.add_argument("--routes", default=None,
                        help="an earlier result JSON of this script (its .routes.npz beside it): "
                        "time attention on its routes, no model needed (--parts attention)")
    parser.add_argument("--backends", default=DEFAULT_BACKEND,
                        help=f"kernel backends timed, comma-separated, of {BACKENDS}")
    parser.add_argument("--seq-lens", default=None,
                        help="comma-separated lengths (default 2048,4096,8192; --toy 32,64)")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: the run's "
                        "held-out documents)")
    parser.add_argument("--out", default="results/bench_model_routes/",
                        help="a directory (model_routes.json, toy.json) or a .json path")
    parser.add_argument("--block", type=int, default=None, help="kernel blocks (128; --toy 16)")
    parser.add_argument("--reps", type=int, default=3, help="repeats per attention timing")
    parser.add_argument("--model-reps", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="CALLS",
                        help="also trace CALLS calls of every whole-model prefill and record "
                        "its device time per kernel and kind of kernel (0: no trace)")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="skip the timings left once this many seconds have passed")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="routed_attention layouts timed per layer (comma-separated)")
    parser.add_argument("--parts", default=None,
                        help="what to time besides the routes, in this order: model, attention "
                        "or both (default model,attention; with --routes attention)")
    parser.add_argument("--toy", action="store_true",
                        help="a tiny random run built here, Pallas interpret mode (CPU)")
    args = parser.parse_args(argv)
    if args.routes and (args.run_dir or args.toy or args.text):
        parser.error("--routes times saved routes: give it without RUN_DIR, --toy or --text")
    if not args.toy and not args.run_dir and not args.routes:
        parser.error("give RUN_DIR (a surgery run's --workdir), --routes or --toy")
    seqs = args.seq_lens or (None if args.routes else "32,64" if args.toy else "2048,4096,8192")
    if seqs is not None:
        try:
            args.seq_lens = [int(x) for x in seqs.split(",")]
        except ValueError:
            parser.error(f"--seq-lens must be comma-separated integers, got {seqs!r}")
        if any(s < 1 for s in args.seq_lens):
            parser.error(f"--seq-lens must be positive, got {seqs!r}")
    args.block = args.block or (16 if args.toy else 128)
    args.layouts = [x for x in args.layouts.split(",") if x]
    args.parts = [x for x in (args.parts or ("attention" if args.routes
                                             else "model,attention")).split(",") if x]
    args.backends = [x for x in args.backends.split(",") if x]
    if not set(args.layouts) <= set(LAYOUTS):
        parser.error(f"--layouts must name some of {LAYOUTS}, got {args.layouts}")
    if not set(args.parts) <= set(PARTS) or len(set(args.parts)) != len(args.parts):
        parser.error(f"--parts must name model and/or attention once each, got {args.parts}")
    if not args.backends or not set(args.backends) <= set(BACKENDS):
        parser.error(f"--backends must name some of {BACKENDS}, got {args.backends}")
    if args.routes and "model" in args.parts:
        parser.error("--parts model needs the run (RUN_DIR): --routes holds routes only")
    if args.profile < 0 or (args.profile and "model" not in args.parts):
        parser.error(f"--profile {args.profile}: give a number of calls >= 1 with --parts model")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.toy and not args.run_dir:
        with tempfile.TemporaryDirectory() as root:
            args.run_dir = build_toy_run(root)
            return run(args)
    return run(args)


if __name__ == "__main__":
    main()
