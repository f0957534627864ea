"""HF safetensors and native checkpoints: round trips against transformers, and bad input."""
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import hf_logits, rel_err
from ultrametric_jax import ConfigError, load_pretrained, save_hf
from ultrametric_jax.io.checkpoints import CheckpointError
from ultrametric_jax.io.hf import (SafetensorsReader, hf_name, parse_size,
                                          write_safetensors)
from ultrametric_jax.io.checkpoints import convert_checkpoint
from ultrametric_jax.io.native import is_native, save_native

pytestmark = pytest.mark.usefixtures("highest_precision")

TOL = 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_save_hf_loads_in_transformers(tiny_hf, tmp_path, tied):
    from transformers import AutoModelForCausalLM
    hf, path = tiny_hf(tie_word_embeddings=tied, attention_bias=True)
    model = load_pretrained(path)
    out = save_hf(model, str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, p in hf.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    ids = np.random.RandomState(0).randint(0, 96, (2, 11))
    assert rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids)) <= TOL
    assert rel_err(model(jnp.asarray(ids)), hf_logits(reloaded, ids)) <= TOL


def test_save_hf_sharded(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM
    hf, path = tiny_hf()
    out = save_hf(load_pretrained(path), str(tmp_path / "out"), max_shard_size="30KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all(os.path.exists(os.path.join(out, s)) for s in shards)
    assert all(os.path.getsize(os.path.join(out, s)) < 30e3 + 2e4 for s in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.RandomState(1).randint(0, 96, (1, 9))
    assert rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids)) <= TOL


def test_save_hf_bfloat16_and_tokenizer(tiny_hf, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, path = tiny_hf()
    model = load_pretrained(path, dtype="bfloat16")
    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = save_hf(model, str(tmp_path / "out"), tokenizer=tok)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16
    ours = np.asarray(model.model.layers[0].self_attn.q_proj.kernel.get_value().astype(jnp.float32)).T
    np.testing.assert_array_equal(w.detach().float().numpy(), ours)
    assert AutoTokenizer.from_pretrained(out)("w3 w5").input_ids == [3, 5]


def test_hf_to_native_roundtrip(tiny_hf, tmp_path):
    hf, path = tiny_hf(attention_bias=True)
    model = load_pretrained(path)
    out = save_native(model, str(tmp_path / "native"))
    assert is_native(out)
    again = load_pretrained(out)
    ids = np.random.RandomState(2).randint(0, 96, (2, 10))
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))),
                                  np.asarray(model(jnp.asarray(ids))))
    assert rel_err(again(jnp.asarray(ids)), hf_logits(hf, ids)) <= TOL
    assert again.config == model.config
    # A different target dtype is restored directly.
    bf16 = load_pretrained(out, dtype="bfloat16")
    assert bf16.model.norm.weight.get_value().dtype == jnp.bfloat16


def test_streaming_convert_equals_loaded_model(tiny_hf, tmp_path):
    """HF -> native without building the model gives exactly the loaded model's parameters."""
    from flax import nnx
    hf, path = tiny_hf(tie_word_embeddings=True, save_kwargs={"max_shard_size": "20KB"})
    out = convert_checkpoint(path, str(tmp_path / "native"), to="native", dtype="bfloat16")
    streamed, loaded = load_pretrained(out, dtype="bfloat16"), load_pretrained(path, dtype="bfloat16")
    a = dict(nnx.to_flat_state(nnx.state(streamed, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert a.keys() == b.keys() and streamed.config == loaded.config
    for key in a:
        assert a[key].get_value().dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a[key].get_value()), np.asarray(b[key].get_value()))
    f32 = load_pretrained(out)  # bf16 on disk, restored as float32
    ids = np.random.RandomState(3).randint(0, 96, (1, 8))
    assert rel_err(f32(ids), hf_logits(hf, ids)) < 5e-2


def test_streaming_convert_reports_shape_mismatch(tiny_hf, tmp_path):
    _, path = tiny_hf()
    _edit_config(path, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"shape mismatch for tensor .*mlp\.down_proj"):
        convert_checkpoint(path, str(tmp_path / "native"), to="native")
    assert not is_native(str(tmp_path / "native"))  # an unfinished conversion is not loadable


def test_native_missing_group(tiny_hf, tmp_path):
    import json as _json
    _, path = tiny_hf()
    out = convert_checkpoint(path, str(tmp_path / "native"), to="native")
    meta_path = os.path.join(out, "ultrametric.json")
    with open(meta_path) as f:
        meta = _json.load(f)
    meta["groups"].remove("model.layers.1")
    with open(meta_path, "w") as f:
        _json.dump(meta, f)
    with pytest.raises(CheckpointError, match=r"lacks the parameter groups \['model.layers.1'\]"):
        load_pretrained(out)


# ----------------------------------------------------------------------------- safetensors io

def test_safetensors_writer_read_by_reference_library(tmp_path):
    from safetensors.torch import load_file
    rng = np.random.RandomState(0)
    tensors = {"a": rng.randn(3, 5).astype(np.float32),
               "b": rng.randn(7).astype(ml_dtypes.bfloat16),
               "c": rng.randn(2, 2, 3).astype(np.float16)}
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.get)
    ref = load_file(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(ref[k].float().numpy(), v.astype(np.float32))
    reader_dir = tmp_path / "d"
    reader_dir.mkdir()
    os.rename(path, reader_dir / "model.safetensors")
    reader = SafetensorsReader(str(reader_dir))
    for k, v in tensors.items():
        got = reader.get(k)
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(got.astype(np.float32), v.astype(np.float32))


def test_name_table():
    assert hf_name(("model", "layers", 3, "self_attn", "q_proj", "kernel")) == (
        "model.layers.3.self_attn.q_proj.weight", True)
    assert hf_name(("model", "embed_tokens", "embedding")) == ("model.embed_tokens.weight", False)
    assert hf_name(("model", "norm", "weight")) == ("model.norm.weight", False)
    assert hf_name(("lm_head", "kernel")) == ("lm_head.weight", True)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("10KiB") == 10240


# ----------------------------------------------------------------------------- bad input

def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_error_non_llama_architecture(tiny_hf):
    _, path = tiny_hf()
    _edit_config(path, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ConfigError, match="unsupported architecture.*mistral"):
        load_pretrained(path)


def test_error_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_pretrained(str(tmp_path))


def test_error_missing_tensor(tiny_hf):
    from safetensors.torch import load_file, save_file
    _, path = tiny_hf()
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(path)


def test_error_shape_mismatch(tiny_hf):
    _, path = tiny_hf()
    _edit_config(path, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"shape mismatch for tensor "
                       r"model\.layers\.0\.mlp\.down_proj\.weight.*expected \(32, 80\), got \(32, 64\)"):
        load_pretrained(path)


def test_error_missing_weights(tiny_hf):
    _, path = tiny_hf()
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_pretrained(path)


def test_error_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))


def _raw_safetensors(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "shorter than 8 bytes"),
    ((10**6).to_bytes(8, "little") + b"{}", "bad header length 1000000"),
    ((4).to_bytes(8, "little") + b"{no}", "invalid safetensors file .*Expecting property name"),
], ids=["short", "header_length", "json"])
def test_error_invalid_safetensors_header(tiny_hf, content, message):
    _, path = tiny_hf()
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(path)


def test_error_missing_shard(tiny_hf):
    _, path = tiny_hf(save_kwargs={"max_shard_size": "20KB"})
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"missing safetensors shard {shard} in "):
        load_pretrained(path)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]},
     "tensor x: unsupported safetensors dtype F8_E4M3"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
     r"tensor x: byte size 8 does not match shape \[3\] of F32"),
], ids=["dtype", "byte_size"])
def test_error_bad_safetensors_entry(tmp_path, entry, message):
    _raw_safetensors(tmp_path / "model.safetensors", {"x": entry}, b"\x00" * 8)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsReader(str(tmp_path)).get("x")


def test_error_unrecognised_checkpoint_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint file .*pytorch_model\.bin: "
                       "expected a .gguf file or a directory"):
        load_pretrained(str(path))


def test_error_unknown_target_format_is_checked_first(tmp_path):
    with pytest.raises(ValueError, match=r"unknown target format 'onnx'; expected one of "
                       r"\('native', 'hf'\)"):
        convert_checkpoint(str(tmp_path / "no_such_source"), str(tmp_path / "out"), to="onnx")
    assert not (tmp_path / "out").exists()


def test_error_native_metadata_of_another_format(tiny_hf, tmp_path):
    _, path = tiny_hf()
    out = convert_checkpoint(path, str(tmp_path / "native"), to="native")
    with open(os.path.join(out, "ultrametric.json"), "w") as f:
        json.dump({"format": "something.else", "version": 1}, f)
    with pytest.raises(CheckpointError, match=r"ultrametric\.json does not describe a "
                       r"ultrametric_jax\.native checkpoint"):
        load_pretrained(out)


def test_save_hf_after_injection_writes_only_the_base_model(tiny_hf, tmp_path):
    """Routers are no part of a transformers Llama: save_hf leaves them out."""
    from flax import nnx
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM
    from ultrametric_jax.surgery.config import SurgeryConfig
    from ultrametric_jax.surgery.inject import inject_topology
    hf, path = tiny_hf(attention_bias=True)
    model = load_pretrained(path)
    inject_topology(model, SurgeryConfig(levels=3, d_max=1, max_len=64), nnx.Rngs(0))
    out = save_hf(model, str(tmp_path / "out"))
    assert sorted(load_file(os.path.join(out, "model.safetensors"))) == sorted(hf.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, p in hf.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    ids = np.random.RandomState(5).randint(0, 96, (2, 11))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
