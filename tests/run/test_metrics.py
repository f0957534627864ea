"""The metrics writer: TensorBoard event files without torch, read back record by record; only
process 0 writes."""
import glob
import os
import struct
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from ultrametric_jax.run.metrics import METRICS_FILE, MetricsWriter, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str) -> list[bytes]:
    """The payloads of a TFRecord file (length, masked CRC of it, payload, masked CRC of it)."""
    blob, out, pos = open(path, "rb").read(), [], 0
    while pos < len(blob):
        header = blob[pos:pos + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack(
            "<I", blob[pos + 8:pos + 12])
        payload = blob[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
        assert header_crc == _masked(_crc32c(header)) and payload_crc == _masked(_crc32c(payload))
        out.append(payload)
        pos += 16 + length
    assert pos == len(blob)
    return out


def test_tensorboard_events_are_written_without_torch(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto.event_pb2 import Event
    script = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError("No module named 'torch' (blocked)", name=name)
                return None
        sys.meta_path.insert(0, BlockTorch())
        from ultrametric_jax.run.metrics import MetricsWriter
        writer = MetricsWriter({str(tmp_path)!r})
        assert writer._tb is not None and type(writer._tb).__module__.startswith("tensorboardX")
        writer.write(3, {{"loss": 0.75, "density": 0.3125}})
        writer.write(5, {{"perplexity": 51.41}}, split="eval")
        writer.write_layer_density(5, [1.0, 0.5, 0.25], [0.75, 0.25, 0.0])
        writer.close()
        assert "torch" not in sys.modules
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    scalars, images = {}, {}
    for payload in read_records(files[0]):
        event = Event.FromString(payload)
        for value in event.summary.value:
            if value.HasField("image"):
                images[(value.tag, event.step)] = value.image
            else:
                scalars[(value.tag, event.step)] = value.simple_value
    assert scalars == {("train/loss", 3): np.float32(0.75), ("train/density", 3): 0.3125,
                       ("eval/perplexity", 5): np.float32(51.41)}
    image = images[("eval/density_per_layer", 5)]
    assert image.encoded_image_string.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", image.encoded_image_string[16:24])  # the IHDR chunk
    assert (width, height) == (image.width, image.height) and width > height > 100
    # The JSONL log is written beside the events.
    assert read_metrics(str(tmp_path / METRICS_FILE)) == [
        {"step": 3, "split": "train", "loss": 0.75, "density": 0.3125},
        {"step": 5, "split": "eval", "perplexity": 51.41}]


def test_a_non_zero_process_writes_nothing(tmp_path, monkeypatch):
    calls = []

    class RecordingWriter:
        def __init__(self, logdir):
            calls.append(("open", logdir))

        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args))

    monkeypatch.setitem(sys.modules, "tensorboardX",
                        types.SimpleNamespace(SummaryWriter=RecordingWriter))
    workdir = tmp_path / "run"
    writer = MetricsWriter(str(workdir), tensorboard=True, process_index=1)
    writer.truncate_after(0)
    writer.write(1, {"loss": 1.0})
    writer.write_layer_density(1, [1.0], [0.5])
    writer.close()
    assert not writer.enabled and calls == [] and not workdir.exists()
    # Process 0 writes both, tensorboardX first.
    writer = MetricsWriter(str(workdir), tensorboard=True, process_index=0)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert calls == [("open", str(workdir / "tensorboard")), ("add_scalar", ("train/loss", 1.0, 1)),
                     ("close", ())]
    assert read_metrics(str(workdir / METRICS_FILE)) == [{"step": 1, "split": "train",
                                                           "loss": 1.0}]


def test_the_default_process_is_this_jax_process(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    assert writer.enabled == (jax.process_index() == 0)
