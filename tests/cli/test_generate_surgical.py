"""`ultrametric generate` on a surgery export and on a surgery run directory: the surgical
model (its routers loaded) decodes through the route cache, token for token as recomputing the
whole sequence without a cache."""
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_cli_foundation import word_tokenizer
from test_generate_errors import generate
from ultrametric_jax import load_pretrained
from ultrametric_jax.cli import train as train_command
from ultrametric_jax.cli.options import configs_dir
from ultrametric_jax.io.tokenizer import decode, encode, load_tokenizer
from ultrametric_jax.run.export import export_surgical_model, load_surgical_export
from ultrametric_jax.run.generate import cache_kind
from ultrametric_jax.run.pipeline import restore_run
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import (base_model_mode, inject_topology,
                                            router_state)

pytestmark = pytest.mark.usefixtures("highest_precision")


def greedy_text(model, tokenizer, prompt, steps):
    """The greedy continuation by recomputing the whole sequence each step (no cache)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    seq = list(encode(tokenizer, prompt))
    for _ in range(steps):
        seq.append(int(np.argmax(np.asarray(forward(state, jnp.asarray([seq])))[0, -1])))
    return prompt + decode(tokenizer, seq[-steps:])


def test_a_surgery_export_generates_as_the_surgical_model(tiny_hf, tmp_path, capsys):
    hf, src = tiny_hf(eos_token_id=None)
    word_tokenizer().save(os.path.join(src, "tokenizer.json"))
    model = load_pretrained(src)
    for layer in model.model.layers:       # sharp attention (the export keeps these weights)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel[...] = proj.kernel[...] * 20.0
    surgery = SurgeryConfig(levels=4, d_max=1, window=3, sink_tokens=1, max_len=64)
    inject_topology(model, surgery, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(router_state(model)):          # scattered routes
        var.set_value(jnp.asarray(rng.normal(size=var.get_value().shape) * 2.0, jnp.float32))
    model.eval()
    out = export_surgical_model(model, surgery, str(tmp_path / "export"), tokenizer_dir=src)

    loaded, loaded_surgery = load_surgical_export(out)
    assert loaded_surgery == surgery and cache_kind(loaded, 64) == "route"
    for (path, a), (_, b) in zip(nnx.to_flat_state(router_state(model)),
                                 nnx.to_flat_state(router_state(loaded))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                      err_msg=str(path))

    prompt = " ".join(f"w{int(i)}" for i in rng.integers(1, 96, 20))
    want = greedy_text(model, load_tokenizer(src), prompt, 8)
    with base_model_mode(model):
        assert greedy_text(model, load_tokenizer(src), prompt, 8) != want   # routers matter
    for cache in ("auto", "route", "dense"):
        status, stdout, _ = generate(capsys, "--model", out, "--prompt", prompt,
                                     "--max-new-tokens", "8", "--cache", cache)
        assert status == 0 and stdout == want + "\n", cache


@pytest.mark.slow
def test_a_surgery_run_directory_generates_its_checkpoint(tmp_path, capsys):
    tiny = os.path.join(configs_dir(), "tiny_random.py")
    base = runpy.run_path(tiny)["write_model"](str(tmp_path / "base"))
    workdir = str(tmp_path / "run")
    assert train_command.main(["--config", tiny, f"--config.model.path={base}",
                               "--workdir", workdir, "--config.train.steps=2"]) == 0
    capsys.readouterr()
    restored = restore_run(os.path.join(workdir, "checkpoints"))
    tokenizer = load_tokenizer(base)
    prompt = "To be, or not to be"
    want = greedy_text(restored.model, tokenizer, prompt, 6)
    for model_arg in (workdir, os.path.join(workdir, "checkpoints")):
        status, stdout, _ = generate(capsys, "--model", model_arg, "--prompt", prompt,
                                     "--max-new-tokens", "6")
        assert status == 0 and stdout == want + "\n"
    status, _, error = generate(capsys, "--model", workdir, "--prompt", prompt, "--step", "99")
    assert status == 2 and error.startswith("no checkpoint step 99 in ")
