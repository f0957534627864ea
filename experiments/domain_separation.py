"""Domain separation: per-document fingerprints of the router's hard routes on three domains
(held-out Shakespeare, Python standard-library code, Python's documentation), and how well they
separate the domains, for the trained router, a freshly collapse-initialised one and a random
one.

  python experiments/domain_separation.py --run-dir RUN [--config.docs_per_domain=60 ...]
  python experiments/domain_separation.py --toy           # CPU: a tiny random run built here

Routes are the surgical model's evaluation routes (extract_routes: cluster ids at the cut level,
per layer and query head), each layer's router reading that layer's own input. A document's
fingerprint is, per (layer, head), the normalised histogram of its tokens' cluster ids (BOS
left out), flattened to layers x heads x clusters numbers. Why a histogram and not the ids
themselves: cluster ids are labels (id 5 is no nearer to 6 than to 60), a token-by-token id
sequence compares documents position by position (meaningless across documents), and a
histogram is invariant to where in the document a token lies and comparable across lengths;
it answers "which parts of the tree does this document use", the domain signal the preprint
claims.

Measures (numpy only): PCA to 2-D by SVD of the centred fingerprints (and each component's share
of the variance), the mean silhouette of the domain labels (Euclidean), and leave-one-out k-NN
accuracy (k = config.knn_k, Euclidean; ties between distances go to the lower document index,
a tied vote to the class of the nearest tied neighbour).

Routers: "trained" (the run's, as restored; --toy perturbs it as kv_condensation.py does, two
toy steps leave it collapsed), "collapse" (fc2 = 0 and the collapse bias: the freshly injected
router; it sends every token of every head to cluster 0, so every fingerprint is the same
vector: the measures are degenerate, reported as silhouette 0, k-NN at chance 1/domains and no
variance, with a note, never NaN), "random" (every router tensor redrawn from a normal of its
trained mean and standard deviation).

Writes <out>/<name>.json, .png and .npz (fingerprints, labels, and with config.save_routes the
cluster ids); prints a Markdown table last.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ring_pruning import load_config  # noqa: E402
from ultrametric_jax.run.data import corpus_tokenizer  # noqa: E402
from ultrametric_jax.run.data_corpus import (Document, _chunk, _unit_hash,  # noqa: E402
                                             load_corpus, split_documents)
from ultrametric_jax.surgery.inject import extract_routes, surgical_layers  # noqa: E402
from ultrametric_jax.surgery.router import RouterParam, collapse_bias  # noqa: E402
from run_dir_cli import parse_run_args, run_parser, restore_or_build  # noqa: E402

CONFIG = ROOT / "configs" / "domain_separation.py"
DOMAINS = ("shakespeare", "python code", "python docs")


# ----------------------------------------------------------------------------- documents

def third_corpus(spec):
    """(documents, description) of the third domain."""
    if spec != "auto":
        return load_corpus(spec), spec
    paths = sorted(p for pattern in ("*.rst", "*.rst.txt")
                   for p in glob.glob(f"/usr/share/doc/python3*-doc/**/{pattern}",
                                      recursive=True))
    if paths:
        return [Document(p, open(p, encoding="utf-8", errors="replace").read())
                for p in paths], f"{len(paths)} reST files of /usr/share/doc/python3*-doc"
    from pydoc_data.topics import topics     # the Python reference's topics, as plain text
    return ([Document(f"pydoc:{name}", text) for name, text in sorted(topics.items())],
            "pydoc_data.topics (Python reference documentation)")


def domain_documents(config, run_data):
    """{domain: (documents, description)}: held-out pieces wherever the run trained."""
    out = {}
    for domain, corpus in zip(DOMAINS, ("shakespeare", "stdlib", None)):
        if corpus is None:
            docs, source = third_corpus(config.third)
        else:
            with warnings.catch_warnings():   # a few stdlib test files are not UTF-8 on purpose
                warnings.simplefilter("ignore", RuntimeWarning)
                docs, source = load_corpus(corpus), corpus
            if corpus == "stdlib":   # pydoc_data/topics.py is the documentation, not code
                docs = [d for d in docs if "pydoc_data" not in d.doc_id]
        # The run's own split (its chunking, its fraction) for the corpus it trained on, then
        # pieces of config.chunk_chars.
        trained_on = corpus is not None and run_data.corpus == corpus
        if trained_on and run_data.chunk_chars > 0:   # 0: the run kept whole documents
            docs = [p for d in docs for p in _chunk(d, run_data.chunk_chars)]
        held_out = split_documents(docs, run_data.val_fraction if trained_on
                                   else config.val_fraction)[1]
        out[domain] = ([p for d in held_out for p in _chunk(d, config.chunk_chars)],
                       f"{source} (held out)")
    return out


def document_rows(docs, tok, count, length, domain):
    """int32 [count, length]: BOS + the first length - 1 tokens of the first `count` documents
    (in hashed-id order, a fixed shuffle) long enough."""
    rows = []
    for doc in sorted(docs, key=lambda d: (_unit_hash(d.doc_id), d.doc_id)):
        ids = tok.encode_batch([doc.text])[0]
        if len(ids) >= length - 1:
            rows.append([tok.bos_id] + ids[:length - 1])
            if len(rows) == count:
                return np.asarray(rows, np.int32)
    hint = (" (or give --config.third a larger corpus: a folder of text files)"
            if domain == DOMAINS[2] else "")
    raise SystemExit(f"domain {domain!r}: only {len(rows)} held-out pieces hold "
                     f"{length - 1} tokens; config.docs_per_domain={count} needs more: lower "
                     f"docs_per_domain or doc_tokens, or raise chunk_chars{hint}")


# ----------------------------------------------------------------------------- routers

def set_router(model, kind, trained, surgery, rng):
    """Loads router `kind` into the model (trained: the given state)."""
    leaves, treedef = jax.tree.flatten(trained)
    if kind == "trained":
        nnx.update(model, trained)
    elif kind == "random":
        nnx.update(model, jax.tree.unflatten(treedef, [
            jnp.asarray(np.mean(x) + np.std(x) * rng.standard_normal(x.shape), x.dtype)
            for x in map(np.asarray, leaves)]))
    elif kind == "collapse":
        nnx.update(model, trained)
        for attn in surgical_layers(model):
            fc2 = attn.router.fc2
            fc2.kernel[...] = jnp.zeros_like(fc2.kernel[...])
            fc2.bias[...] = collapse_bias(attn.router.num_heads, surgery.num_levels,
                                          surgery.arity, surgery.init_margin)
    else:
        raise SystemExit(f"unknown router {kind!r} (trained, collapse, random)")


def routes_of(model, rows, batch):
    """int32 [layers, N, H, S]: the hard cluster ids of every row."""
    return np.concatenate([np.asarray(extract_routes(model, jnp.asarray(rows[i:i + batch]))
                                      .cluster_ids) for i in range(0, len(rows), batch)], axis=1)


def fingerprints(ids, num_clusters):
    """float64 [N, layers * H * clusters]: per (layer, head) the share of the document's tokens
    (BOS left out) in each cluster."""
    ids = ids[..., 1:]
    layers, n, heads, seq = ids.shape
    onehot = ids[..., None] == np.arange(num_clusters)
    hist = onehot.sum(axis=3) / seq                                 # [layers, N, H, C]
    return hist.transpose(1, 0, 2, 3).reshape(n, -1).astype(np.float64)


# ----------------------------------------------------------------------------- measures

def distances(x):
    """Euclidean distance matrix (float64), exact zeros on the diagonal."""
    sq = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


def pca2(x):
    """(coordinates [N, 2], variance share of every component) by SVD of the centred x."""
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    var = s ** 2
    share = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    coords = np.zeros((len(x), 2))
    k = min(2, len(s))
    coords[:, :k] = u[:, :k] * s[:k]
    return coords, share


def silhouette(d, labels):
    """Mean silhouette: (b - a) / max(a, b) per point, 0 where a and b are both 0 or the
    point's class has no other member."""
    scores = []
    for i in range(len(d)):
        own = (labels == labels[i]) & (np.arange(len(d)) != i)
        if not own.any():
            scores.append(0.0)
            continue
        a = d[i, own].mean()
        b = min(d[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        scores.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return float(np.mean(scores))


def knn_accuracy(d, labels, k):
    """Leave-one-out k-NN accuracy (see the module docstring for the tie rules)."""
    n = len(d)
    right = 0
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        nearest = others[np.lexsort((others, d[i, others]))][:k]
        votes = {c: int(np.sum(labels[nearest] == c)) for c in np.unique(labels[nearest])}
        best = max(votes.values())
        winner = next(labels[j] for j in nearest if votes[labels[j]] == best)
        right += winner == labels[i]
    return right / n


def measures(x, labels, k):
    classes = len(np.unique(labels))
    distinct = len(np.unique(x, axis=0))
    coords, share = pca2(x)
    out = dict(distinct_fingerprints=distinct, pca=coords.tolist(),
               variance_share=share[:2].tolist() + [0.0] * (2 - len(share[:2])),
               total_variance=float(np.sum((x - x.mean(0)) ** 2) / max(len(x) - 1, 1)))
    if distinct == 1:
        out.update(silhouette=0.0, knn_accuracy=1.0 / classes, degenerate=(
            "every document has the same fingerprint (all tokens of every head in one "
            "cluster): no distance separates anything; silhouette 0 (a = b = 0), k-NN at "
            "chance (every neighbour ties), no variance"))
        return out
    d = distances(x)
    out.update(silhouette=silhouette(d, labels), knn_accuracy=knn_accuracy(d, labels, k),
               degenerate=None)
    return out


# ----------------------------------------------------------------------------- figure, table

def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    routers = list(result["routers"])
    labels = np.array(result["labels"])
    fig, axes = plt.subplots(1, len(routers), figsize=(5 * len(routers), 4.4), squeeze=False)
    for ax, name in zip(axes[0], routers):
        r = result["routers"][name]
        xy = np.array(r["pca"])
        for c, domain in enumerate(result["domains"]):
            ax.scatter(xy[labels == c, 0], xy[labels == c, 1], s=14, label=domain, alpha=0.8)
        share = r["variance_share"]
        ax.set(title=f"{name}: silhouette {r['silhouette']:.2f}, {r['knn_k']}-NN "
                     f"{100 * r['knn_accuracy']:.0f}%",
               xlabel=f"PC1 ({100 * share[0]:.0f}% of the variance)",
               ylabel=f"PC2 ({100 * share[1]:.0f}%)")
        if r["degenerate"]:
            ax.text(0.5, 0.5, "all fingerprints identical", transform=ax.transAxes,
                    ha="center", va="center", color="gray")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: route fingerprints ({result['layers']} layers x "
                 f"{result['heads']} heads x {result['num_clusters']} clusters), "
                 f"{result['config']['doc_tokens']} tokens per document")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result):
    head = ["router", "silhouette", f"{result['config']['knn_k']}-NN accuracy (LOO)",
            "PC1 / PC2 variance", "distinct fingerprints", "clusters used per head"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["routers"].items():
        cells = [name, f"{r['silhouette']:.3f}", f"{100 * r['knn_accuracy']:.1f}%",
                 f"{100 * r['variance_share'][0]:.1f}% / {100 * r['variance_share'][1]:.1f}%",
                 f"{r['distinct_fingerprints']} of {len(result['labels'])}",
                 f"{r['clusters_used_per_head']:.1f} of {result['num_clusters']}"]
        if r["degenerate"]:
            cells[0] += " (degenerate)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = run_parser(__doc__.splitlines()[0], CONFIG, ROOT / "results" / "domain_separation")
    parser.add_argument("--save-routes", action="store_true",
                        help="also save every router's cluster ids in the .npz (--toy: always)")
    return parse_run_args(parser, argv, has_run=lambda args: args.run_dir)


def restore(args):
    return restore_or_build(args.run_dir, args.toy, "domain_separation_")


def main(argv=None):
    args, overrides = parse_args(argv)
    config = load_config(args.config, args.toy, overrides)
    if config.knn_k < 1 or config.docs_per_domain <= config.knn_k // len(DOMAINS):
        raise SystemExit(f"config.knn_k={config.knn_k} and docs_per_domain="
                         f"{config.docs_per_domain}: give k >= 1 and more documents")
    restored, run_dir = restore(args)
    model, surgery = restored.model, restored.surgery
    if config.doc_tokens > model.config.max_position_embeddings:
        raise SystemExit(f"config.doc_tokens={config.doc_tokens} exceeds the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    tok = corpus_tokenizer(restored.base_model["path"], model.config)
    docs = domain_documents(config, restored.run.data)
    rows = np.concatenate([document_rows(d, tok, config.docs_per_domain, config.doc_tokens,
                                         name) for name, (d, _) in docs.items()])
    labels = np.repeat(np.arange(len(DOMAINS)), config.docs_per_domain)
    num_clusters = surgery.arity ** surgery.cut_level
    trained = nnx.state(model, RouterParam)
    trained = jax.tree.map(lambda x: jnp.array(x), trained)          # a copy, not a view
    rng = np.random.default_rng(config.seed)
    result = dict(config=config.to_dict(), run_dir=os.path.abspath(run_dir), step=restored.step,
                  model=os.path.basename(restored.base_model["path"].rstrip("/")),
                  domains=list(DOMAINS), sources={k: s for k, (_, s) in docs.items()},
                  layers=len(model.model.layers), heads=model.config.num_attention_heads,
                  num_clusters=num_clusters, cut_level=surgery.cut_level,
                  labels=labels.tolist(), routers={})
    arrays = dict(labels=labels, rows=rows)
    for kind in config.routers:
        set_router(model, kind, trained, surgery, rng)
        ids = routes_of(model, rows, config.batch)
        x = fingerprints(ids, num_clusters)
        entry = measures(x, labels, config.knn_k)
        used = [len(np.unique(ids[l, :, h, 1:])) for l in range(ids.shape[0])
                for h in range(ids.shape[2])]
        entry.update(knn_k=config.knn_k, clusters_used_per_head=float(np.mean(used)))
        result["routers"][kind] = entry
        arrays[f"fingerprints_{kind}"] = x.astype(np.float32)
        if args.toy or args.save_routes:
            arrays[f"routes_{kind}"] = ids
        print(f"{kind}: silhouette {entry['silhouette']:.3f}, k-NN "
              f"{100 * entry['knn_accuracy']:.1f}%", flush=True)
    nnx.update(model, trained)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "toy" if args.toy else config.name
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    np.savez_compressed(out / f"{stem}.npz", **arrays)
    plot(result, out / f"{stem}.png")
    print(f"\nresults: {out / (stem + '.json')}, {out / (stem + '.png')}, "
          f"{out / (stem + '.npz')}")
    print(f"\nDomain separation, {result['model']} step {restored.step}: "
          f"{config.docs_per_domain} documents x {config.doc_tokens} tokens per domain "
          f"({', '.join(f'{k}: {s}' for k, s in result['sources'].items())}); fingerprints of "
          f"{result['layers']} layers x {result['heads']} heads x {num_clusters} clusters")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
