"""A damaged run checkpoint is refused or skipped without Orbax's "Event loop is closed"
noise: the step's arrays are read synchronously before Orbax restores them concurrently."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ultrametric_jax.run.checkpoint_probe import probe_ocdbt_item

# Three damaged runs, each refused by the reader and recovered by the checkpointer; what the
# user would see on stderr is the process's stderr.
RECOVERY = """
import gc, os, sys, tempfile, time, warnings
import jax.numpy as jnp
import numpy as np
from ultrametric_jax.run import checkpoint as rc
BASE = {"path": "/m", "files": {"model.safetensors": "ab" * 32}}
rng = np.random.default_rng(0)
state = {f"a{i:02d}": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32) for i in range(48)}
template = {k: jnp.zeros_like(v) for k, v in state.items()}
def flip_all(step_dir):
    for d, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(d) == "d":
            for name in files:
                path = os.path.join(d, name)
                with open(path, "rb") as f: raw = f.read()
                with open(path, "wb") as f: f.write(bytes(b ^ 0xFF for b in raw))
for attempt in range(3):
    directory = os.path.join(tempfile.mkdtemp(), "ckpt")
    ckpt = rc.RunCheckpointer(directory, keep=3)
    for step in (1, 2):
        ckpt.save(step, state, data_state={}, base_model=BASE)
    ckpt.close()
    flip_all(os.path.join(directory, "2"))
    try:
        rc.RunCheckpointReader(directory).restore(2, template)
    except rc.CorruptCheckpointError as e:
        print("refused:", e.reason[:60], file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = rc.RunCheckpointer(directory, keep=3).restore_latest(template)
    print("recovered step", restored.step, file=sys.stderr)
gc.collect()
time.sleep(1.0)  # reads left in flight would land by now
print("done", file=sys.stderr)
"""


def test_recovering_from_a_damaged_step_prints_no_event_loop_noise(tmp_path):
    result = subprocess.run([sys.executable, "-c", RECOVERY], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path)},
                            timeout=600)
    err = result.stderr
    assert result.returncode == 0, err
    assert err.count("refused: ValueError: DATA_LOSS") == 3
    assert err.count("recovered step 1") == 3 and err.rstrip().endswith("done")
    assert "Event loop is closed" not in err and "Traceback" not in err, err


def test_probe_reads_a_sound_item_and_ignores_other_layouts(tmp_path):
    import jax.numpy as jnp
    from ultrametric_jax.run.checkpoint import RunCheckpointer
    state = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((5, 3)), jnp.float32)}
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"), keep=1)
    ckpt.save(1, state, data_state={}, base_model={"files": {}})
    ckpt.close()
    probe_ocdbt_item(str(tmp_path / "ckpt" / "1" / "state"))   # sound: no error
    probe_ocdbt_item(str(tmp_path))                            # not an OCDBT item: a no-op
    manifest = tmp_path / "ckpt" / "1" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])
    with pytest.raises(ValueError, match="DATA_LOSS|manifest"):
        probe_ocdbt_item(str(tmp_path / "ckpt" / "1" / "state"))
