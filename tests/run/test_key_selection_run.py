"""Key selectors through a run: routers trained on the tiny random Llama without selectors, then
`ultrametric eval --config.surgery.key_rank=...` fits them on training rows, reports their
calibration and writes them beside the checkpoints; restoring the run adopts them, `ultrametric
export` carries them to PyTorch, where the surgical model gives the JAX model's logits and
greedy tokens; selectors fitted for another step are refused or, for a run trained without
them, left out."""
import json
import os
import runpy

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402

from test_export import rel_err, torch_greedy, torch_logits  # noqa: E402
from ultrametric_jax.cli import eval as eval_command  # noqa: E402
from ultrametric_jax.cli import export as export_command  # noqa: E402
from ultrametric_jax.cli import train as train_command  # noqa: E402
from ultrametric_jax.pytorch import surgical_llama as torch_surgery  # noqa: E402
from ultrametric_jax.run import generate as jax_generate  # noqa: E402
from ultrametric_jax.run.evaluate import evaluate_surgical  # noqa: E402
from ultrametric_jax.run.export import (SELECTOR_FILE, ExportError,  # noqa: E402
                                        load_surgical_export, selector_info)
from ultrametric_jax.run.pipeline import restore_run, restore_selectors  # noqa: E402
from ultrametric_jax.surgery.key_selector import SELECT_ALL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny_random.py")


@pytest.fixture(scope="module")
def selector_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("selector_run")
    base = runpy.run_path(TINY_CONFIG)["write_model"](str(root / "base"))
    workdir, out = str(root / "run"), str(root / "hf")
    model = ["--config", TINY_CONFIG, f"--config.model.path={base}", "--workdir", workdir]
    assert train_command.main(model) == 0
    assert eval_command.main(model + [
        "--config.surgery.key_rank=3", "--config.selection.target_density=0.5",
        "--config.selection.fit_rows=4", "--config.selection.steps=12"]) == 0
    assert export_command.main(["--workdir", workdir, "--out", out]) == 0
    return workdir, out


@pytest.mark.slow
def test_a_run_fits_reports_and_exports_its_key_selectors(selector_run):
    workdir, out = selector_run
    with open(os.path.join(workdir, "eval.json")) as f:
        report = json.load(f)
    fitted = report["selection"]
    assert fitted["key_rank"] == 3 and fitted["step"] == 12 and fitted["fit_rows"] == 4
    # calibrated on training rows: at or above the target there, and the selector narrows the
    # held-out mask below the tree's own pairs
    assert fitted["density"] >= 0.5 and fitted["log_threshold"] > SELECT_ALL
    surgical = report["surgical"]
    restored = restore_run(os.path.join(workdir, "checkpoints"))
    assert selector_info(os.path.join(workdir, SELECTOR_FILE)) == fitted
    for layer in restored.model.model.layers:
        assert float(layer.self_attn.selector.log_threshold[...]) == pytest.approx(
            fitted["log_threshold"])
    # the restored model reproduces the reported held-out numbers
    from ultrametric_jax.run.pipeline import setup_run
    from ultrametric_jax.run.settings import RunConfig
    with open(os.path.join(workdir, "config.json")) as f:
        run = RunConfig.from_dict(json.load(f))
    again = evaluate_surgical(restored.model, setup_run(run).val_batches, restored.surgery)
    assert again["perplexity"] == pytest.approx(surgical["perplexity"], rel=1e-5)
    assert again["density"] == pytest.approx(surgical["density"], abs=1e-9)
    from ultrametric_jax.run.key_selection import set_threshold
    set_threshold(restored.model, SELECT_ALL)         # the routes' own mask: denser
    assert evaluate_surgical(restored.model, setup_run(run).val_batches,
                             restored.surgery)["density"] > surgical["density"] + 0.05
    set_threshold(restored.model, fitted["log_threshold"])
    # the export holds them, PyTorch runs them: logits and greedy tokens as in JAX
    exported = load_file(os.path.join(out, SELECTOR_FILE))
    for name in ("query_proj", "key_proj"):
        np.testing.assert_array_equal(
            exported[f"model.layers.1.self_attn.selector.{name}"],
            np.asarray(getattr(restored.model.model.layers[1].self_attn.selector, name)[...]))
    ids = np.random.default_rng(7).integers(3, 320, size=(2, 32))
    want = np.asarray(restored.model(jnp.asarray(ids)))
    surgical_torch = torch_surgery.load_surgical_llama(out)
    assert rel_err(torch_logits(surgical_torch, ids), want) <= 1e-4
    prompt = ids[:, :6]
    np.testing.assert_array_equal(torch_greedy(surgical_torch, prompt, 20),
                                  jax_generate.generate(restored.model, prompt, 20))
    # ... and without the selectors the logits differ: they were exercised
    plain_torch = torch_surgery.load_surgical_llama(out)
    for layer in plain_torch.model.layers:
        layer.self_attn.selector.log_threshold.fill_(SELECT_ALL)
    assert rel_err(torch_logits(plain_torch, ids), want) > 1e-3
    # the export read back into JAX
    model, surgery = load_surgical_export(out)
    assert surgery.key_rank == 3
    assert rel_err(np.asarray(model(jnp.asarray(ids))), want) <= 1e-6


@pytest.mark.slow
def test_selectors_of_another_step_or_missing_are_refused(selector_run, tmp_path):
    workdir, out = selector_run
    checkpoints = os.path.join(workdir, "checkpoints")
    # the run trained without selectors: its step 8 restores as it trained, routers only
    assert all(layer.self_attn.selector is None
               for layer in restore_run(checkpoints, step=8).model.model.layers)
    restored = restore_run(checkpoints)                  # step 12: the selectors fitted for it
    with pytest.raises(ExportError, match=r"fitted for the routers of step 12, not step 8"):
        restore_selectors(restored.model, checkpoints, 8)
    os.rename(os.path.join(workdir, SELECTOR_FILE), str(tmp_path / "aside"))
    try:
        with pytest.raises(ExportError, match=r"missing key selectors: .* does not exist"):
            restore_selectors(restored.model, checkpoints, 12)
        # without the file, the run restores as it trained
        assert restore_run(checkpoints).model.model.layers[0].self_attn.selector is None
    finally:
        os.rename(str(tmp_path / "aside"), os.path.join(workdir, SELECTOR_FILE))
    os.remove(os.path.join(out, SELECTOR_FILE))
    with pytest.raises(FileNotFoundError, match="missing key selectors"):
        torch_surgery.load_surgical_llama(out)
