"""experiments/domain_separation.py at toy size (the session's tiny random run): fingerprints
recomputed from the saved cluster ids, PCA against an eigendecomposition of the covariance,
silhouette by a double loop and k-NN by an explicit distance matrix, all in float64."""
import hashlib
import importlib.util
import json
import pathlib
from collections import Counter

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_run_dir):
    spec = importlib.util.spec_from_file_location(
        "domain_separation", ROOT / "experiments" / "domain_separation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("domains")
    module.main(["--toy", "--run-dir", toy_run_dir, "--out", str(out)])
    return json.loads((out / "toy.json").read_text()), dict(np.load(out / "toy.npz")), out


def fingerprint_oracle(routes, clusters):
    """Per document, per (layer, head), the share of its tokens after BOS in each cluster."""
    layers, docs, heads, seq = routes.shape
    out = np.zeros((docs, layers, heads, clusters))
    for d in range(docs):
        for layer in range(layers):
            for h in range(heads):
                for t in range(1, seq):
                    out[d, layer, h, routes[layer, d, h, t]] += 1.0 / (seq - 1)
    return out.reshape(docs, -1)


def dist(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2)))


def silhouette_oracle(x, labels):
    total = 0.0
    for i in range(len(x)):
        mean_to = {}
        for c in set(labels.tolist()):
            ds = [dist(x[i], x[j]) for j in range(len(x)) if labels[j] == c and j != i]
            mean_to[c] = sum(ds) / len(ds)
        a = mean_to.pop(labels[i])
        b = min(mean_to.values())
        total += 0.0 if max(a, b) == 0 else (b - a) / max(a, b)
    return total / len(x)


def knn_oracle(x, labels, k):
    d = np.array([[dist(a, b) for b in x] for a in x])
    right = 0
    for i in range(len(x)):
        ranked = sorted((d[i, j], j) for j in range(len(x)) if j != i)[:k]
        votes = Counter(labels[j] for _, j in ranked)
        best = max(votes.values())
        winner = [labels[j] for _, j in ranked if votes[labels[j]] == best][0]
        right += winner == labels[i]
    return right / len(x)


def test_measures_match_independent_computations(toy):
    result, arrays, _ = toy
    labels = arrays["labels"]
    cfg = result["config"]
    assert labels.tolist() == result["labels"] and len(labels) == 3 * cfg["docs_per_domain"]
    assert arrays["rows"].shape == (len(labels), cfg["doc_tokens"])
    for kind in ("trained", "random"):
        routes = arrays[f"routes_{kind}"]
        assert routes.shape == (result["layers"], len(labels), result["heads"], cfg["doc_tokens"])
        x = fingerprint_oracle(routes, result["num_clusters"])
        np.testing.assert_allclose(arrays[f"fingerprints_{kind}"], x, atol=1e-6)
        r = result["routers"][kind]
        assert r["degenerate"] is None and r["distinct_fingerprints"] == len(labels)
        # PCA: the variance shares are the top eigenvalues of the covariance over their sum;
        # the coordinates are the projections on those eigenvectors (up to sign).
        centred = x - x.mean(axis=0)
        evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
        evals, evecs = evals[::-1], evecs[:, ::-1]
        np.testing.assert_allclose(r["variance_share"], evals[:2] / evals.sum(), rtol=1e-6)
        np.testing.assert_allclose(np.abs(r["pca"]), np.abs(centred @ evecs[:, :2]), atol=1e-6)
        assert r["silhouette"] == pytest.approx(silhouette_oracle(x, labels), abs=1e-9)
        assert r["knn_accuracy"] == pytest.approx(knn_oracle(x, labels, cfg["knn_k"]))
        assert r["silhouette"] != 0 and 0 < r["knn_accuracy"]
        used = np.mean([len(np.unique(routes[i, :, h, 1:])) for i in range(routes.shape[0])
                        for h in range(routes.shape[2])])
        assert r["clusters_used_per_head"] == pytest.approx(used) and used > 1
    # the random router is not the trained one
    assert not np.array_equal(arrays["routes_trained"], arrays["routes_random"])


def test_the_collapsed_router_is_reported_as_degenerate(toy):
    result, arrays, _ = toy
    routes = arrays["routes_collapse"]
    assert np.all(routes == 0)              # child 0 at every level: cluster 0 everywhere
    r = result["routers"]["collapse"]
    assert r["degenerate"] and r["distinct_fingerprints"] == 1
    assert r["silhouette"] == 0.0 and r["knn_accuracy"] == pytest.approx(1 / 3)
    assert r["variance_share"] == [0.0, 0.0] and r["total_variance"] == 0.0
    assert np.all(np.array(r["pca"]) == 0) and r["clusters_used_per_head"] == 1.0
    text = json.dumps(result)
    assert "NaN" not in text and "Infinity" not in text


def test_the_figure_is_written(toy):
    _, _, out = toy
    png = out / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000



def test_a_run_that_kept_whole_documents_gets_its_own_split(monkeypatch):
    """A run with data.chunk_chars = 0 (the default: whole documents) held out whole
    documents: the in-domain pieces are the documents of lowest id hash (sha256, the split's
    rule), each cut into ceil(n / 56) pieces of four 14-character lines, counted by hand."""
    spec = importlib.util.spec_from_file_location(
        "domain_separation_split", ROOT / "experiments" / "domain_separation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plays = [module.Document(f"play{i}", ("line of verse\n" * 30)[:100 + 50 * i])
             for i in range(6)]
    other = [module.Document(f"code{i}", "x = 1\n" * 20) for i in range(2)]
    monkeypatch.setattr(module, "load_corpus",
                        lambda name: plays if name == "shakespeare" else other)
    monkeypatch.setattr(module, "third_corpus", lambda spec: (other, "two files"))
    config = type("C", (), dict(chunk_chars=60, val_fraction=0.5, third="auto"))()
    run_data = type("D", (), dict(corpus="shakespeare", chunk_chars=0, val_fraction=0.5))()
    pieces = module.domain_documents(config, run_data)["shakespeare"][0]

    def unit(doc_id):
        return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0**64
    n_val = min(max(sum(unit(d.doc_id) < 0.5 for d in plays), 1), len(plays) - 1)
    held = sorted(plays, key=lambda d: unit(d.doc_id))[:n_val]
    assert len(pieces) == sum(-(-len(d.text) // 56) for d in held)
    for d in held:
        assert "".join(p.text for p in pieces if p.doc_id.split("#")[0] == d.doc_id) == d.text


def test_a_zero_chunk_width_is_refused():
    from ultrametric_jax.run.data_corpus import Document, _chunk
    with pytest.raises(ValueError, match="chunk_chars"):
        _chunk(Document("d", "some text"), 0)
