"""Router-only training and evaluation on the tiny random Llama (configs/tiny_random.py)."""
import dataclasses
import json
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultrametric_jax.cli.options import configs_dir, parse_flags
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.evaluate import evaluate_surgical, node_entropy_bits, perplexity
from ultrametric_jax.run.pipeline import check_mesh, inject, make_trainer, setup_run
from ultrametric_jax.run.settings import RunConfig
from ultrametric_jax.run.step import MUTABLE, accumulate_gradients, make_grad_fn
from ultrametric_jax.run.trainer import NonFiniteLossError
from ultrametric_jax.surgery.tree import pair_counts
from ultrametric_jax.surgery.inject import forward_with_aux
from ultrametric_jax.surgery.router import RouterParam

TINY = os.path.join(configs_dir(), "tiny_random.py")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return runpy.run_path(TINY)["write_model"](str(tmp_path_factory.mktemp("tiny")))


def base_parameters_fingerprint(model) -> np.ndarray:
    """All non-router parameters flattened to one float64 vector (for identity checks)."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(RouterParam)))
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state)])


def tiny_config(model_dir, *overrides) -> RunConfig:
    config, _, _ = parse_flags(["--config", TINY, f"--config.model.path={model_dir}",
                                *[f"--config.{o}" for o in overrides]])
    return RunConfig.from_config_dict(config)


def trainer_of(config, setup, workdir):
    return make_trainer(config, setup, check_mesh(config), str(workdir), progress=False)


def with_settings(config, section, **changes) -> RunConfig:
    """`config` with fields of one section replaced (the settings are frozen)."""
    return dataclasses.replace(config, **{
        section: dataclasses.replace(getattr(config, section), **changes)})


def _eval_loss(model, batches, lam):
    """Deterministic (evaluation-mode) CE + lambda * balance over fixed batches."""
    model.eval()
    out = []
    for b in batches:
        logits, aux = forward_with_aux(model, jnp.asarray(b["input_ids"]),
                                       jnp.asarray(b["attention_mask"]))
        from ultrametric_jax.surgery.losses import mean_cross_entropy
        out.append(float(mean_cross_entropy(logits, jnp.asarray(b["input_ids"]),
                                            jnp.asarray(b["attention_mask"])))
                   + lam * float(aux["balance_loss"]))
    return float(np.mean(out))


@pytest.mark.slow
def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, "train.steps=16")
    setup = setup_run(config)
    fresh = base_parameters_fingerprint(setup_run(config).model)
    dense = perplexity(setup.model, setup.val_batches)
    inject(config, setup.model)
    # Collapse initialisation: the surgical model is the dense model, bit for bit.
    start = evaluate_surgical(setup.model, setup.val_batches, config.surgery)
    assert start["perplexity"] == dense["perplexity"]
    assert start["density"] == 1.0 and start["tree_density"] == 1.0
    lam = config.surgery.lambda_max
    before = _eval_loss(setup.model, setup.val_batches, lam)
    trainer = trainer_of(config, setup, tmp_path)
    outcome = trainer.train()
    trainer.close()
    assert outcome.step == 16
    after = _eval_loss(setup.model, setup.val_batches, lam)
    assert after < before - 0.3, (before, after)  # collapsed balance loss p=2 -> near 1
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert np.mean([r["loss"] for r in records[-4:]]) < np.mean([r["loss"] for r in records[:4]])
    assert {"loss", "ce", "balance_loss", "tau", "lambda", "density", "tokens_per_s"} <= set(
        records[0])
    # Only the routers moved: every base parameter is bit-identical to a fresh load.
    np.testing.assert_array_equal(base_parameters_fingerprint(setup.model), fresh)
    # Evaluation densities counted from cluster ids agree with the attention's own count.
    result = evaluate_surgical(setup.model, setup.val_batches[:1], config.surgery)
    b = setup.val_batches[0]
    _, aux = forward_with_aux(setup.model, jnp.asarray(b["input_ids"]),
                              jnp.asarray(b["attention_mask"]))
    np.testing.assert_allclose(result["density_per_layer"], aux["density_per_layer"], rtol=1e-6)
    np.testing.assert_allclose(result["tree_density_per_layer"], aux["tree_density_per_layer"],
                               rtol=1e-6)
    assert result["density"] < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 4])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path,
                                                              log_every):
    config = tiny_config(tiny_model_dir, "train.steps=8", "checkpoint.every=2")
    setup = setup_run(config)
    inject(config, setup.model)
    trainer = trainer_of(config, setup, tmp_path)
    trainer.run = with_settings(config, "train", steps=4)
    trainer.train()
    assert trainer.checkpointer.all_steps() == [2, 4]
    trainer.run = with_settings(with_settings(config, "train", steps=8, log_every=log_every),
                                "checkpoint", every=4)
    reads, read = [], trainer._read_metrics
    trainer._read_metrics = lambda pending, seconds: (
        reads.append([step for step, _ in pending]), read(pending, seconds))[1]
    trainer.params = jax.tree.map(lambda x: x * jnp.nan, trainer.params)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 5 .*"
                                                 r"last good checkpoint is step 4"):
        trainer.train(resume=False)
    # The host reads the metrics on logging and saving steps only; with log_every=4 the NaN of
    # step 5 is found at step 8, before step 8 is saved.
    assert reads == ([[5]] if log_every == 1 else [[5, 6, 7, 8]])
    assert trainer.checkpointer.all_steps() == [2, 4]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    trainer.close()


@pytest.mark.slow
def test_metrics_are_read_on_logging_and_saving_steps(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, "train.steps=7", "train.log_every=3",
                         "checkpoint.every=5")
    setup = setup_run(config)
    inject(config, setup.model)
    trainer = trainer_of(config, setup, tmp_path)
    reads, read = [], trainer._read_metrics
    trainer._read_metrics = lambda pending, seconds: (
        reads.append([step for step, _ in pending]), read(pending, seconds))[1]
    outcome = trainer.train()
    trainer.close()
    assert reads == [[1, 2, 3], [4, 5], [6], [7]]
    assert trainer.checkpointer.all_steps() == [5, 7]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [3, 6, 7]
    assert outcome.last_metrics == {k: v for k, v in records[-1].items()
                                    if k not in ("step", "split")}
    assert all(r["tokens_per_s"] > 0 for r in records)


def test_seq_len_beyond_the_model_positions_is_named(tiny_model_dir):
    config = tiny_config(tiny_model_dir, "train.seq_len=300", "surgery.max_len=512")
    with pytest.raises(ConfigError, match=r"invalid config value train.seq_len=300: the model "
                                          r"supports at most 256 positions"):
        setup_run(config)


@pytest.mark.slow
def test_gradient_accumulation_is_the_mean_of_micro_batch_gradients(tiny_model_dir):
    config = tiny_config(tiny_model_dir)
    setup = setup_run(config)
    inject(config, setup.model)
    # Move the routers off the collapse point so that the gradients are not negligible.
    state = nnx.state(setup.model, RouterParam)
    rng = np.random.default_rng(0)
    nnx.update(setup.model, jax.tree.map(
        lambda x: x + jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), state))
    setup.model.train()
    graphdef, params, mutable, frozen = nnx.split(setup.model, RouterParam, MUTABLE, ...)
    grad_fn = make_grad_fn(graphdef)
    ids = jnp.asarray(setup.train_data.tokens[:4].reshape(2, 2, -1))
    mask = jnp.asarray(setup.train_data.mask[:4].reshape(2, 2, -1))
    grads, mutable_out, scalars = jax.jit(accumulate_gradients, static_argnums=0)(
        grad_fn, params, mutable, frozen, ids, mask, 1.0)
    # Oracle: the micro-batches one after the other, in float64 averaging.
    expected, m = None, mutable
    losses = []
    for i in range(2):
        (loss, (_, m)), g = jax.jit(grad_fn)(params, m, frozen, ids[i], mask[i], 1.0)
        losses.append(float(loss))
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
        expected = g if expected is None else jax.tree.map(np.add, expected, g)
    expected = jax.tree.map(lambda x: x / 2, expected)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(expected)) > 1e-6
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(scalars["loss"]), losses, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(mutable_out), jax.tree.leaves(m)):
        got, want = (jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype,
                                                                     jax.dtypes.prng_key) else x
                     for x in (got, want))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- evaluation math

def _brute_force_counts(clusters, valid, window, sink):
    b, h, s = clusters.shape
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    causal = np.broadcast_to((j <= i)[None, None] & valid[:, None, :, None]
                             & valid[:, None, None, :], (b, h, s, s))
    same = clusters[..., :, None] == clusters[..., None, :]
    fixed = ((j < sink) | (i - j < window))[None, None]
    return ((causal & same).sum((0, 2, 3)), (causal & (same | fixed)).sum((0, 2, 3)),
            causal.sum((0, 2, 3)))


@pytest.mark.parametrize("window, sink", [(0, 0), (1, 0), (3, 1), (4, 2), (40, 3), (0, 5)])
def test_pair_counts_match_brute_force(window, sink):
    rng = np.random.default_rng(window * 10 + sink)
    clusters = rng.integers(0, 4, size=(3, 2, 17))
    valid = np.ones((3, 17), bool)
    valid[1, 12:] = False
    valid[2, 5:] = False
    got = pair_counts(jnp.asarray(clusters, jnp.int32), window, sink,
                      jnp.asarray(valid)[:, None, :])
    for g, w in zip(got, _brute_force_counts(clusters, valid, window, sink)):
        np.testing.assert_array_equal(np.asarray(g).sum(0), w)


def test_node_entropy_closed_forms():
    valid = np.ones((2, 16), bool)
    # Every token in its own leaf of a depth-4 binary tree: depth l+1 holds 2^(l+1) equal nodes.
    uniform = np.tile(np.arange(16), (2, 3, 1))
    np.testing.assert_allclose(node_entropy_bits(uniform, valid, 2, 4), [1, 2, 3, 4])
    np.testing.assert_allclose(node_entropy_bits(np.zeros((2, 3, 16), int), valid, 2, 4), 0)
    # Half the tokens in leaf 0, half in leaf 3 (= digits 00 / 11): 1 bit at both depths.
    two = np.tile(np.repeat([0, 3], 8), (2, 1, 1))
    np.testing.assert_allclose(node_entropy_bits(two, valid, 2, 2), [1, 1])


# ----------------------------------------------------------------------------- metrics

def test_metrics_jsonl_truncation_and_tensorboard(tmp_path, monkeypatch):
    import sys
    import types

    from ultrametric_jax.run.metrics import MetricsWriter, read_metrics
    scalars = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeWriter))
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "ce": np.float32(2.0)})
    writer.write(3, {"perplexity": 7.0}, split="eval")
    writer.close()
    assert scalars[:2] == [("train/loss", 1.0, 1), ("train/ce", 2.0, 1)]
    assert scalars[-2:] == [("eval/perplexity", 7.0, 3), "closed"]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "spl')  # a line torn by a kill
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")] == [1, 2, 3]
    MetricsWriter(str(tmp_path), tensorboard=False).truncate_after(1)
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert records == [{"step": 1, "split": "train", "loss": 1.0, "ce": 2.0}]


# ----------------------------------------------------------------------------- losses

def test_cross_entropy_matches_float64_reference():
    from ultrametric_jax.surgery.losses import mean_cross_entropy, token_cross_entropy
    from ultrametric_jax.surgery.objectives import ObjectiveConfig, combine_objectives
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 5, 7)) * 3
    ids = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    weights = mask[:, 1:]
    total, count = token_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(ids),
                                       jnp.asarray(mask))
    assert float(count) == 6.0
    np.testing.assert_allclose(float(total), (nll * weights).sum(), rtol=1e-6)
    mean = mean_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(ids),
                              jnp.asarray(mask))
    np.testing.assert_allclose(float(mean), (nll * weights).sum() / 6, rtol=1e-6)
    np.testing.assert_allclose(float(mean_cross_entropy(jnp.asarray(logits, jnp.float32),
                                                        jnp.asarray(ids))),
                               nll.mean(), rtol=1e-6)
    # The default objective is CE + lambda * balance.
    total, _ = combine_objectives(ObjectiveConfig(), cross_entropy=mean,
                                  balance=jnp.float32(1.5), lam=0.25)
    np.testing.assert_allclose(float(total), (nll * weights).sum() / 6 + 0.375, rtol=1e-6)
