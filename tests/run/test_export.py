"""Export of a surgery run to Hugging Face / PyTorch, checked against the JAX surgical model.

Round trips: HF dir -> JAX -> inject -> train -> Orbax -> `ultrametric export` ->
load_surgical_llama, on the tiny random Llama of configs/tiny_random.py and on SmolLM2.
"""
import json
import os
import runpy
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import torch_clusters  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ultrametric_jax.run import generate as jax_generate  # noqa: E402
from ultrametric_jax.pytorch import surgical_llama as torch_surgery  # noqa: E402
from ultrametric_jax.io.checkpoints import load_pretrained  # noqa: E402
from ultrametric_jax.cli import app as cli  # noqa: E402
from ultrametric_jax.cli import export as export_command  # noqa: E402
from ultrametric_jax.cli import train as train_command  # noqa: E402
from ultrametric_jax.surgery.config import SurgeryConfig  # noqa: E402
from ultrametric_jax.run.export import (ROUTER_FILE, SURGERY_CONFIG_KEY, ExportError,  # noqa: E402
                                        export_surgical_model)
from ultrametric_jax.run.pipeline import export_run, restore_run  # noqa: E402
from ultrametric_jax.surgery.router import RouterParam  # noqa: E402
from ultrametric_jax.surgery.inject import extract_routes, inject_topology  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny_random.py")
TOL = 1e-4   # logits: max |jax - torch| / max |jax| (float32)


def rel_err(a, ref) -> float:
    """max |a - ref| relative to max |ref| (the project's logits metric)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def export_cli(capsys, *argv):
    """`ultrametric export ARGV` as the user runs it: (exit status, stderr)."""
    rc = cli.main(["export", *argv])
    return rc, capsys.readouterr().err


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.float().numpy()


def torch_greedy(model, prompt, new_tokens):
    model.generation_config.eos_token_id = None   # no early stop: compare every token
    prompt = torch.as_tensor(np.asarray(prompt))
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out.numpy()[:, prompt.shape[1]:]


def assert_round_trip(jax_model, hf_dir, ids, prompt, new_tokens=32):
    """Routes, logits and greedy generations of the export equal the JAX surgical model's."""
    routes = extract_routes(jax_model, jnp.asarray(ids))
    assert float(routes.density) < 1.0, "the routes must be non-trivial"
    surgical = torch_surgery.load_surgical_llama(hf_dir)
    clusters, margins = torch_clusters(surgical, ids, margins=True)
    differ = clusters != np.asarray(routes.cluster_ids)
    # Two float32 implementations may split an exact tie differently, nothing else: every
    # token routed differently must sit at a router-logit gap of float32 rounding size.
    print(f"routes differing: {int(differ.sum())} of {differ.size}; their margins "
          f"{margins[differ]}")
    assert np.all(margins[differ] < 1e-4) and differ.mean() < 1e-4
    want = np.asarray(jax_model(jnp.asarray(ids)))
    got = torch_logits(surgical, ids)
    assert rel_err(got, want) <= TOL
    jax_tokens = jax_generate.generate(jax_model, prompt, new_tokens)
    np.testing.assert_array_equal(torch_greedy(surgical, prompt, new_tokens), jax_tokens)
    return surgical


def assert_same_base_weights(hf_dir, source_tensors):
    """model*.safetensors of the export hold exactly the source tensors: names, dtypes, bits."""
    from ultrametric_jax.io.hf import SafetensorsReader
    reader = SafetensorsReader(hf_dir)
    assert sorted(reader.names()) == sorted(source_tensors)
    for name, ref in source_tensors.items():
        got = reader.get(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert got.tobytes() == np.ascontiguousarray(ref).tobytes(), name


# ----------------------------------------------------------------------------- export.py alone

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_base") / "base"
    return runpy.run_path(TINY_CONFIG)["write_model"](str(path))


def perturbed_surgical(base_dir, surgery, seed=0):
    """The base model with injected routers whose fc2 is deliberately randomised (no training),
    so that the hard routes split tokens."""
    model = load_pretrained(base_dir)
    inject_topology(model, surgery, nnx.Rngs(params=seed, gumbel=seed + 1))
    state = nnx.state(model, RouterParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + jax.random.normal(k, x.shape) * 2.0 for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    model.eval()
    return model


@pytest.mark.slow
def test_export_of_injected_model_matches_jax(tiny_base, tmp_path):
    surgery = SurgeryConfig(arity=3, levels=3, d_max=1, window=3, sink_tokens=2, max_len=256)
    model = perturbed_surgical(tiny_base, surgery)
    out = export_surgical_model(model, surgery, str(tmp_path / "hf"), tokenizer_dir=tiny_base)
    ids = np.random.default_rng(0).integers(3, 320, size=(2, 40))
    surgical = assert_round_trip(model, out, ids, ids[:, :6])
    # Left padding: positions count real tokens only, in both frameworks.
    mask = np.ones(ids.shape, bool)
    mask[1, :9] = False
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    want = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos),
                            attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        got = surgical(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask).long(),
                       position_ids=torch.as_tensor(pos)).logits.numpy()
    assert rel_err(got[mask], want[mask]) <= TOL
    # The router file: HF names, torch layout, float32, equal to the JAX kernels transposed.
    routers = load_file(os.path.join(out, ROUTER_FILE))
    layer = model.model.layers[1].self_attn.router
    name = "model.layers.1.self_attn.router."
    assert sorted(routers) == sorted(f"model.layers.{i}.self_attn.router.{n}" for i in range(2)
                                     for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    np.testing.assert_array_equal(routers[name + "fc1.weight"], np.asarray(layer.fc1.kernel[...]).T)
    np.testing.assert_array_equal(routers[name + "fc2.bias"], np.asarray(layer.fc2.bias[...]))
    assert all(t.dtype == np.float32 for t in routers.values())
    with open(os.path.join(out, "config.json")) as f:
        assert SurgeryConfig.from_dict(json.load(f)[SURGERY_CONFIG_KEY]) == surgery
    assert_same_base_weights(out, load_file(os.path.join(tiny_base, "model.safetensors")))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(out, name), "rb") as a:
            with open(os.path.join(tiny_base, name), "rb") as b:
                assert a.read() == b.read(), name


def test_plain_from_pretrained_loads_the_dense_base_with_a_note(tiny_base, tmp_path):
    surgery = SurgeryConfig(levels=3, d_max=1, window=2, max_len=256)
    out = export_surgical_model(perturbed_surgical(tiny_base, surgery), surgery,
                                str(tmp_path / "hf"))
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    source = transformers.AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ids = np.random.default_rng(1).integers(3, 320, size=(2, 24))
    np.testing.assert_array_equal(torch_logits(plain, ids), torch_logits(source.eval(), ids))
    assert not any("router" in n for n, _ in plain.named_parameters())
    # The note: the config names the surgery, the README says how to load the routers.
    assert getattr(plain.config, SURGERY_CONFIG_KEY)["d_max"] == 1
    with open(os.path.join(out, "README.md")) as f:
        readme = f.read()
    assert "load_surgical_llama" in readme and ROUTER_FILE in readme and "ignored" in readme


def test_load_surgical_llama_refuses_plain_or_incomplete_dirs(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="no 'ultrametric_surgery' section.*plain model"):
        torch_surgery.load_surgical_llama(tiny_base)
    with pytest.raises(FileNotFoundError, match="export directory .* does not exist"):
        torch_surgery.load_surgical_llama(str(tmp_path / "nowhere"))
    surgery = SurgeryConfig(levels=3, d_max=1, window=2, max_len=256)
    out = export_surgical_model(perturbed_surgical(tiny_base, surgery), surgery,
                                str(tmp_path / "hf"))
    os.remove(os.path.join(out, ROUTER_FILE))
    with pytest.raises(FileNotFoundError, match="missing router weights: .*router.safetensors"):
        torch_surgery.load_surgical_llama(out)


def test_export_refuses_bad_router_state_and_occupied_out(tiny_base, tmp_path):
    surgery = SurgeryConfig(levels=3, d_max=1, window=2, max_len=256)
    plain = load_pretrained(tiny_base)
    with pytest.raises(ExportError, match="lack 8 of 8 tensors, e.g. model.layers.0"):
        export_surgical_model(plain, surgery, str(tmp_path / "a"))
    model = perturbed_surgical(tiny_base, surgery)
    other = SurgeryConfig(levels=4, d_max=1, window=2, max_len=256)
    with pytest.raises(ExportError, match=r"fc2.weight has shape \(24, 32\), expected \(32, 32\)"):
        export_surgical_model(model, other, str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="exists and is not empty.*--overwrite"):
        export_surgical_model(model, surgery, str(tmp_path / "c"))
    with pytest.raises(ExportError, match="is not an earlier export; refusing to replace it"):
        export_surgical_model(model, surgery, str(tmp_path / "c"), overwrite=True)
    assert (tmp_path / "c" / "keep.txt").exists()
    first = export_surgical_model(model, surgery, str(tmp_path / "d"))
    (tmp_path / "d" / "stale.txt").write_text("x")
    assert export_surgical_model(model, surgery, str(tmp_path / "d"), overwrite=True) == first
    assert not (tmp_path / "d" / "stale.txt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left


# ----------------------------------------------------------------------------- a trained run

@pytest.fixture(scope="module")
def tiny_run(tiny_base, tmp_path_factory):
    """A 12-step training run of configs/tiny_random.py (checkpoints at steps 8 and 12) and its
    export through the command line."""
    root = tmp_path_factory.mktemp("tiny_run")
    workdir, out = str(root / "run"), str(root / "hf")
    rc = train_command.main(["--config", TINY_CONFIG, f"--config.model.path={tiny_base}",
                             "--workdir", workdir])
    assert rc == 0
    assert export_command.main(["--workdir", workdir, "--out", out]) == 0
    return types.SimpleNamespace(base=tiny_base, workdir=workdir, out=out,
                                 checkpoints=os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_tiny_run_round_trip(tiny_run):
    restored = restore_run(tiny_run.checkpoints)
    assert restored.step == 12
    with open(os.path.join(tiny_run.out, "config.json")) as f:
        info = json.load(f)["ultrametric_export"]
    assert info["step"] == 12 and info["base_model"]["path"] == os.path.abspath(tiny_run.base)
    ids = np.random.default_rng(7).integers(3, 320, size=(2, 48))   # fresh, not training data
    assert_round_trip(restored.model, tiny_run.out, ids, ids[:, :8])
    assert_same_base_weights(tiny_run.out,
                             load_file(os.path.join(tiny_run.base, "model.safetensors")))


@pytest.mark.slow
def test_export_of_an_earlier_step_by_checkpoint_path(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "step8")
    rc, err = export_cli(capsys, "--checkpoint", os.path.join(tiny_run.checkpoints, "8"),
                         "--out", out)
    assert rc == 0, err
    step8 = load_file(os.path.join(out, ROUTER_FILE))
    step12 = load_file(os.path.join(tiny_run.out, ROUTER_FILE))
    assert any(not np.array_equal(step8[k], step12[k]) for k in step8)
    restored = restore_run(tiny_run.checkpoints, step=8)
    ids = np.random.default_rng(8).integers(3, 320, size=(1, 40))
    got = torch_logits(torch_surgery.load_surgical_llama(out), ids)
    assert rel_err(got, np.asarray(restored.model(jnp.asarray(ids)))) <= TOL


@pytest.mark.slow
def test_bad_sources_give_clear_errors(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, err = export_cli(capsys, "--workdir", str(tmp_path / "missing"), "--out", out)
    assert rc == 2 and "--workdir" in err and "does not exist" in err
    (tmp_path / "not_a_run").mkdir()
    rc, err = export_cli(capsys, "--workdir", str(tmp_path / "not_a_run"), "--out", out)
    assert rc == 2 and "is not a surgery run directory: it has no checkpoints/" in err
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    rc, err = export_cli(capsys, "--workdir", str(tmp_path / "empty_run"), "--out", out)
    assert rc == 2 and "no checkpoint in" in err
    rc, err = export_cli(capsys, "--workdir", tiny_run.workdir, "--step", "5", "--out", out)
    assert rc == 2 and "no checkpoint step 5" in err and "available: [8, 12]" in err
    rc, err = export_cli(capsys, "--workdir", tiny_run.workdir, "--checkpoint",
                         tiny_run.checkpoints, "--out", out)
    assert rc == 2 and "not allowed with argument" in err
    rc, err = export_cli(capsys, "--workdir", tiny_run.workdir)
    assert rc == 2 and "--out" in err
    rc, err = export_cli(capsys, "--workdir", tiny_run.workdir, "--out", tiny_run.out)
    assert rc == 2 and "exists and is not empty" in err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_corrupt_checkpoint_is_refused(tiny_run, tmp_path, capsys):
    copy = str(tmp_path / "checkpoints")
    shutil.copytree(tiny_run.checkpoints, copy)
    state_dir = os.path.join(copy, "12", "state")
    data = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs
            if os.path.basename(d) == "d"]          # OCDBT's array data files
    assert data
    for path in data:           # flip every byte of the array data files
        raw = bytearray(open(path, "rb").read())
        with open(path, "wb") as f:
            f.write(bytes(b ^ 0xFF for b in raw))
    rc, err = export_cli(capsys, "--checkpoint", copy, "--out", str(tmp_path / "out"))
    assert rc == 2 and "checkpoint step 12" in err and ("corrupt" in err or "unreadable" in err)


@pytest.mark.slow
def test_changed_base_model_is_refused(tiny_run, tmp_path, capsys):
    weights = os.path.join(tiny_run.base, "model.safetensors")
    original = open(weights, "rb").read()
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    from safetensors.numpy import save_file
    try:
        save_file(tensors, weights, metadata={"format": "pt"})
        rc, err = export_cli(capsys, "--workdir", tiny_run.workdir, "--out",
                             str(tmp_path / "out"))
        assert rc == 2
        assert "no longer matches the checkpoint's recorded hash" in err
        assert "model.safetensors: recorded sha256" in err
        assert not os.path.exists(tmp_path / "out")
    finally:
        with open(weights, "wb") as f:
            f.write(original)
    moved = str(tmp_path / "moved")
    shutil.move(tiny_run.base, moved)
    try:
        rc, err = export_cli(capsys, "--workdir", tiny_run.workdir, "--out",
                             str(tmp_path / "out"))
        assert rc == 2 and "the base model the run trained on" in err and "no longer exists" in err
    finally:
        shutil.move(moved, tiny_run.base)


# ----------------------------------------------------------------------------- SmolLM2

def first_layers(hf_dir, layers):
    """hf_dir cut to its first `layers` decoder layers, in place (config.json and weights)."""
    from safetensors.numpy import save_file
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = layers
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    path = os.path.join(hf_dir, "model.safetensors")
    kept = {name: w for name, w in load_file(path).items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    save_file(kept, path, metadata={"format": "pt"})
    return hf_dir


@pytest.mark.slow
def test_smollm2_round_trip(smollm2_jax, smollm2_tokenizer, tmp_path):
    """SmolLM2 as an HF directory -> JAX -> inject -> 3 training steps -> Orbax -> export. Its
    first two layers: its own weights, tokenizer, tied embeddings and 9 / 3 heads, at a
    fraction of the compile time (every layer takes the same path)."""
    from ultrametric_jax.io.checkpoints import save_hf
    base = first_layers(save_hf(smollm2_jax, str(tmp_path / "smollm2_hf"),
                                tokenizer=smollm2_tokenizer), 2)
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    # A small collapse margin (0.1 instead of 5) lets three steps at lr 3e-2 move the routes
    # (with margin 5 the evaluation routes stay collapsed for dozens of steps).
    rc = train_command.main([
        "--config", "smollm2_shakespeare", f"--config.model.path={base}",
        "--config.surgery.init_margin=0.1", "--config.train.lr=3e-2",
        "--config.train.steps=3", "--config.train.seq_len=64", "--config.train.batch_size=2",
        "--config.data.max_chars=30000", "--config.data.chunk_chars=3000",
        "--config.eval.batches=1", "--config.eval.batch_size=1", "--config.checkpoint.every=3",
        "--config.mesh.data=1", "--workdir", workdir])
    assert rc == 0
    restored = export_run(os.path.join(workdir, "checkpoints"), out)  # the command's own path
    assert restored.step == 3
    ids = np.random.default_rng(9).integers(0, 49152, size=(2, 80))
    assert_round_trip(restored.model, out, ids, ids[:, :8])
    assert_same_base_weights(out, load_file(os.path.join(base, "model.safetensors")))
    with open(os.path.join(out, "tokenizer.json"), "rb") as a, \
            open(os.path.join(base, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
