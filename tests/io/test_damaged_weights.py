"""Damaged weights are refused on load, naming the file and the tensor: truncated files,
overwritten bytes, NaNs, inconsistent indexes, casts that overflow."""
import json
import os

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import build_hf_llama
from gguf_writer import write_llama_gguf
from ultrametric_jax import load_pretrained
from ultrametric_jax.cli import app as cli
from ultrametric_jax.errors import CheckpointError
from ultrametric_jax.io.checkpoints import convert_checkpoint
from ultrametric_jax.io.hf import SafetensorsReader
from ultrametric_jax.io.native import save_native
from ultrametric_jax.io.verify import first_nonfinite


def run_cli(capsys, *argv):
    """(exit status, stderr) of `ultrametric ARGV`, stderr holding only this command's output."""
    capsys.readouterr()
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def assert_one_line_error(err, command):
    """The command's error is one line, the last of its stderr (after any progress bar)."""
    lines = [l for l in err.split("\n") if l.strip()]
    assert "Traceback" not in err
    assert lines[-1].split("\r")[-1].startswith(f"ultrametric {command}: error: "), err
    assert err.count(f"ultrametric {command}: error: ") == 1
    return lines[-1].split("\r")[-1]


def _cut_in_half(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _tensor_ranges(path):
    """{name: (begin, end)} of a safetensors file's tensors, in absolute file offsets (the
    test's own reading of the format, independent of the loader)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def test_safetensors_cut_in_half_is_refused_naming_a_cut_tensor(tiny_hf):
    _, path = tiny_hf()
    weights = os.path.join(path, "model.safetensors")
    full = os.path.getsize(weights)
    cut_off = {k for k, (_, end) in _tensor_ranges(weights).items() if end > full // 2}
    _cut_in_half(weights)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert message.startswith(f"invalid safetensors file {weights}: tensor ")
    assert "the file is truncated" in message
    assert message.split(": tensor ")[1].split(":")[0] in cut_off


def test_convert_of_a_truncated_file_exits_2_and_writes_nothing(tiny_hf, tmp_path, capsys):
    _, path = tiny_hf()
    _cut_in_half(os.path.join(path, "model.safetensors"))
    dst = tmp_path / "native"
    status, err = run_cli(capsys, "convert", path, str(dst))
    line = assert_one_line_error(err, "convert")
    assert status == 2 and line.startswith("ultrametric convert: error: invalid safetensors file ")
    assert line.endswith("the file is truncated")
    assert not dst.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_nan_planted_in_a_tensor_is_refused(tiny_hf, capsys):
    _, path = tiny_hf()
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    tensors["model.layers.1.mlp.up_proj.weight"][7, 0] = np.inf
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=(
            r"tensor model\.layers\.1\.mlp\.up_proj\.weight in .*model\.safetensors holds 2 "
            r"non-finite value\(s\) \(NaN or inf\), the first at index \(3, 5\)")):
        load_pretrained(path)
    # Through the command line: one line, status 2.
    status, err = run_cli(capsys, "generate", "--model", path, "--prompt", "w1")
    assert status == 2
    assert "model.layers.1.mlp.up_proj.weight" in assert_one_line_error(err, "generate")


def test_index_listing_a_tensor_its_shard_lacks_is_refused(tiny_hf):
    _, path = tiny_hf(save_kwargs={"max_shard_size": "20KB"})
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=rf"missing tensor {name} in shard {shards[1]} of "):
        SafetensorsReader(path)


def test_float32_weights_beyond_float16_range_are_refused_on_cast(tiny_hf):
    _, path = tiny_hf()
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"][2] = 1e6  # finite in float32, inf in float16
    save_file(tensors, weights, metadata={"format": "pt"})
    assert np.isfinite(load_pretrained(path).model.norm.weight.get_value()).all()
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight in .* holds 1 "
                       r"non-finite value\(s\) \(NaN or inf\) after casting float32 to float16"):
        load_pretrained(path, dtype="float16")


def test_native_checkpoint_holding_a_nan_is_refused(tiny_hf, tmp_path):
    _, path = tiny_hf()
    model = load_pretrained(path)
    kernel = model.model.layers[0].self_attn.o_proj.kernel
    kernel.set_value(kernel.get_value().at[1, 2].set(np.nan))
    out = save_native(model, str(tmp_path / "native"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.o_proj\."
                       r"weight in .*model\.layers\.0 holds 1 non-finite value"):
        load_pretrained(out)


# ----------------------------------------------------------------------------- GGUF

def _gguf_tensor_ranges(path):
    reader = gguf.GGUFReader(path)
    return {t.name: (t.data_offset, t.data_offset + t.n_bytes) for t in reader.tensors}


def test_gguf_with_4kib_overwritten_in_the_middle_is_refused(tmp_path, capsys):
    path = write_llama_gguf(build_hf_llama(), tmp_path / "tiny.gguf")
    size = os.path.getsize(path)
    begin, end = size // 2 - 2048, size // 2 + 2048
    hit = {k for k, (b, e) in _gguf_tensor_ranges(path).items() if b < end and e > begin}
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(begin)
        f.write(noise)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert f"in {path} holds" in message and "after dequantisation" in message
    assert message.split()[1] in hit
    status, err = run_cli(capsys, "convert", path, str(tmp_path / "out"))
    assert status == 2 and "non-finite" in assert_one_line_error(err, "convert")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_names_the_first_tensor_cut_off(tmp_path):
    path = write_llama_gguf(build_hf_llama(), tmp_path / "tiny.gguf")
    ranges = _gguf_tensor_ranges(path)
    size = os.path.getsize(path)
    cut = size // 2
    first_cut = min((b, k) for k, (b, e) in ranges.items() if e > cut)[1]
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(CheckpointError, match=(
            rf"invalid GGUF file {path}: tensor {first_cut} needs bytes \[\d+, "
            rf"{ranges[first_cut][1]}\) but the file has {cut} bytes: the file is truncated")):
        load_pretrained(path)


def test_first_nonfinite_counts_in_chunks(monkeypatch):
    from ultrametric_jax.io import verify
    monkeypatch.setattr(verify, "_CHUNK", 7)
    arr = np.random.default_rng(1).standard_normal((5, 9)).astype(np.float32)
    assert first_nonfinite(arr) is None
    arr[2, 4], arr[4, 8], arr[4, 1] = np.nan, -np.inf, np.inf
    assert first_nonfinite(arr) == (3, 2 * 9 + 4)
    assert first_nonfinite(np.arange(6)) is None  # integers hold no NaN
