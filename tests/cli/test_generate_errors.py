"""`ultrametric generate` with bad input: one line on stderr and status 2, argument errors
before any model is loaded, loader errors named, half surgery exports refused."""
import json
import os

import numpy as np
import pytest
import torch
from flax import nnx

from test_cli_foundation import word_tokenizer
from ultrametric_jax import load_pretrained
from ultrametric_jax.cli import app as cli
from ultrametric_jax.run.export import export_surgical_model
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import inject_topology


def generate(capsys, *argv):
    """(status, stdout, the error message) of `ultrametric generate ARGV`."""
    capsys.readouterr()
    status = cli.main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if status == 0:
        return status, out, None
    assert err.count("\n") == 1 and err.startswith("ultrametric generate: error: "), err
    return status, out, err[len("ultrametric generate: error: "):-1]


@pytest.mark.parametrize("flags, message", [
    (["--prompt", ""], "--prompt is empty: give some text to continue"),
    (["--prompt", "w1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", "w1", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
    (["--prompt", "w1", "--temperature", "-0.5"],
     "--temperature must be >= 0 and finite (0 = greedy), got -0.5"),
    (["--prompt", "w1", "--temperature", "nan"],
     "--temperature must be >= 0 and finite (0 = greedy), got nan"),
    (["--prompt", "w1", "--top-k", "0"], "--top-k must be >= 1 (leave it out for no limit), got 0"),
    (["--prompt", "w1", "--top-k", "-2"],
     "--top-k must be >= 1 (leave it out for no limit), got -2"),
    (["--prompt", "w1", "--dtype", "int4"], "unknown dtype 'int4'; expected one of ['bf16', "
                                           "'bfloat16', 'float16', 'float32', 'fp16', 'fp32']"),
], ids=["empty_prompt", "zero_tokens", "negative_tokens", "negative_temperature",
        "nan_temperature", "top_k_0", "top_k_negative", "dtype"])
def test_argument_errors_come_before_loading(tmp_path, capsys, flags, message):
    # The model does not exist: the argument is checked first.
    status, out, error = generate(capsys, "--model", tmp_path / "missing", *flags)
    assert (status, out, error) == (2, "", message)


@pytest.fixture
def tiny_with_tokenizer(tiny_hf):
    hf, src = tiny_hf(eos_token_id=None)
    word_tokenizer().save(os.path.join(src, "tokenizer.json"))
    return hf, src


def test_prompt_longer_than_the_context_names_both_lengths(tiny_with_tokenizer, capsys):
    _, src = tiny_with_tokenizer                      # max_position_embeddings = 128
    long_prompt = " ".join(f"w{i % 90}" for i in range(130))
    status, _, error = generate(capsys, "--model", src, "--prompt", long_prompt)
    assert status == 2
    assert error == "the prompt has 130 tokens, more than the model's context of 128 tokens"
    fits = " ".join(f"w{i % 90}" for i in range(120))
    status, _, error = generate(capsys, "--model", src, "--prompt", fits, "--max-new-tokens", "9")
    assert error == ("the prompt (120 tokens) plus 9 new tokens exceed the model's context of "
                     "128 tokens; ask for at most 8 new tokens")
    status, out, _ = generate(capsys, "--model", src, "--prompt", fits, "--max-new-tokens", "8")
    assert status == 0 and out.startswith(fits) and len(out[len(fits):].split()) == 8


def test_half_surgery_exports_are_refused_not_run_dense(tiny_with_tokenizer, tmp_path, capsys):
    """An export without its routers, or routers without their topology, cannot run as the
    surgical model and must not silently run as the base model."""
    _, src = tiny_with_tokenizer
    model = load_pretrained(src)
    surgery = SurgeryConfig(levels=3, d_max=1, max_len=64)
    inject_topology(model, surgery, nnx.Rngs(0))
    out = export_surgical_model(model, surgery, str(tmp_path / "export"), tokenizer_dir=src)
    router = os.path.join(out, "router.safetensors")
    os.rename(router, router + ".bak")
    status, stdout, error = generate(capsys, "--model", out, "--prompt", "w1 w2")
    assert status == 2 and stdout == ""
    assert error == (f"{out} is a surgery export without its routers: {router} does not exist")
    os.rename(router + ".bak", router)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    del config["ultrametric_surgery"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    status, stdout, error = generate(capsys, "--model", out, "--prompt", "w1 w2")
    assert error == (f"{out} holds router.safetensors but its config.json has no "
                     "'ultrametric_surgery' section: the routers' topology is unknown")
    # --step names a run's checkpoint: refused for anything else, before loading.
    status, _, error = generate(capsys, "--model", src, "--prompt", "w1", "--step", "3")
    assert error == (f"--step picks a checkpoint of a surgery run directory; {src} is not "
                     "one (it has no checkpoints/)")
    # The base model it was exported from still generates.
    assert generate(capsys, "--model", src, "--prompt", "w1 w2", "--max-new-tokens", "2")[0] == 0


def _edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_loader_errors_are_one_line(tiny_with_tokenizer, capsys):
    _, src = tiny_with_tokenizer
    config = os.path.join(src, "config.json")
    original = open(config).read()
    cases = [
        (lambda: open(config, "w").write("{not json"),
         f"invalid config.json {config}: Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)"),
        (lambda: _edit_config(src, model_type="mistral", architectures=["MistralForCausalLM"]),
         "unsupported architecture: model_type='mistral', architectures=['MistralForCausalLM']; "
         "only Llama-architecture checkpoints (model_type 'llama', LlamaForCausalLM) can be "
         "loaded"),
        (lambda: _edit_config(src, head_dim=0), "head_dim=0 must be a whole number >= 1"),
        (lambda: _edit_config(src, intermediate_size=80),
         f"shape mismatch for tensor model.layers.0.mlp.down_proj.weight in {src}: expected "
         "(32, 80), got (32, 64)"),
    ]
    for damage, message in cases:
        with open(config, "w") as f:
            f.write(original)
        damage()
        assert generate(capsys, "--model", src, "--prompt", "w1")[2] == message


def test_missing_tokenizer_is_one_line(tiny_hf, capsys):
    _, src = tiny_hf()
    status, _, error = generate(capsys, "--model", src, "--prompt", "w1")
    assert status == 2
    assert error == f"no tokenizer found for {src} (expected tokenizer.json beside the weights)"
