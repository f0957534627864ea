"""The training objectives through the real step on the tiny random Llama (configs/
tiny_random.py): distillation and recall terms of the step against direct recomputations, the
density budget moving the training density toward its target, dual multipliers checkpointed,
and the base model untouched."""
import dataclasses
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultrametric_jax.cli.options import configs_dir, parse_flags
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.pipeline import check_mesh, inject, make_trainer, setup_run
from ultrametric_jax.run.settings import RunConfig
from ultrametric_jax.run.step import MUTABLE, make_grad_fn
from ultrametric_jax.surgery.inject import base_model_mode, forward_with_aux
from ultrametric_jax.surgery.objectives import output_distillation_loss
from ultrametric_jax.surgery.router import RouterParam

TINY = os.path.join(configs_dir(), "tiny_random.py")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return runpy.run_path(TINY)["write_model"](str(tmp_path_factory.mktemp("tiny")))


def tiny_config(model_dir, *overrides) -> RunConfig:
    config, _, _ = parse_flags(["--config", TINY, f"--config.model.path={model_dir}",
                                *[f"--config.{o}" for o in overrides]])
    return RunConfig.from_config_dict(config)


def perturb_routers(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.model.layers:
        fc2 = layer.self_attn.router.fc2
        fc2.kernel[...] = jnp.asarray(rng.normal(size=fc2.kernel.shape) * 0.5, jnp.float32)


def one_grad_step(run, seed, lam):
    """(model, ids, mask, loss, scalars, grads) of one compiled micro-batch gradient of the
    injected tiny model with perturbed routers (the model at the parameters the step saw)."""
    setup = setup_run(run)
    inject(run, setup.model)
    perturb_routers(setup.model, seed)
    setup.model.train()
    batch = setup.val_batches[0]
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    graphdef, params, mutable, frozen = nnx.split(setup.model, RouterParam, MUTABLE, ...)
    (loss, (scalars, _)), grads = jax.jit(make_grad_fn(graphdef, run.objective))(
        params, mutable, frozen, ids, mask, lam)
    model = nnx.merge(graphdef, params, mutable, frozen, copy=True)
    return model, ids, mask, loss, scalars, grads


def test_step_loss_is_the_weighted_sum_of_its_recomputed_terms(tiny_model_dir):
    run = tiny_config(tiny_model_dir, "objective.kd_weight=0.5",
                      "objective.recall_weight=0.25")
    lam = 0.7
    model, ids, mask, loss, scalars, grads = one_grad_step(run, seed=1, lam=lam)
    # The same terms recomputed from the same model state, outside the step.
    with base_model_mode(model):
        dense = model(ids, attention_mask=mask)
    logits, aux = forward_with_aux(model, ids, mask, extras=("recall",))
    kd = float(output_distillation_loss(dense, logits, mask))
    assert kd > 1e-4                         # the topology changes the distribution
    np.testing.assert_allclose(float(scalars["kd"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(scalars["recall"]), float(aux["recall"]), rtol=1e-5)
    want = (float(scalars["ce"]) + 0.5 * kd + 0.25 * float(aux["recall"])
            + lam * float(aux["balance_loss"]))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["penalty", "dual"])
def test_density_budget_moves_training_density_toward_the_target(tiny_model_dir, tmp_path,
                                                                budget):
    common = ("train.steps=10", "checkpoint.every=5", "surgery.lambda_max=0.0")
    free = tiny_config(tiny_model_dir, *common)
    bound = tiny_config(tiny_model_dir, *common, "objective.density_target=0.3",
                        "objective.budget_routes=argmax",
                        f"objective.budget={budget}", "objective.budget_mu=50.0",
                        "objective.dual_eta=5.0")
    finals = {}
    for name, run in (("free", free), ("bound", bound)):
        setup = setup_run(run)
        fresh = nnx.state(setup.model, nnx.Param)
        inject(run, setup.model)
        trainer = make_trainer(run, setup, check_mesh(run), str(tmp_path / f"{name}{budget}"),
                               progress=False)
        try:
            outcome = trainer.train()
        finally:
            trainer.close()
        finals[name] = outcome.last_metrics["density"]
        finals[name + "_argmax"] = outcome.last_metrics["argmax_density"]
        # The base model is frozen whatever the objective.
        after = nnx.state(setup.model, nnx.All(nnx.Param, nnx.Not(RouterParam)))
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(fresh)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if name == "bound" and budget == "dual":
            nu = np.asarray(setup.model.density_multiplier[...])
            assert nu.shape == () and nu > 0            # the total density was above 0.3
    assert finals["bound"] < finals["free"] - 0.05, finals
    # The budget binds the routes evaluation runs (objective.budget_routes="argmax").
    assert finals["bound_argmax"] < finals["free_argmax"] - 0.05, finals


@pytest.mark.parametrize("routes", ["argmax", "sampled"])
def test_budget_binds_the_density_of_the_chosen_routes(tiny_model_dir, routes):
    """The penalty of one step, recomputed from the reported densities of the routes it
    binds: the argmax routes (evaluation's) or the Gumbel routes the step sampled."""
    run = tiny_config(tiny_model_dir, "objective.density_target=0.2",
                      "objective.budget=penalty", "objective.budget_mu=10.0",
                      f"objective.budget_routes={routes}")
    _, _, _, _, scalars, grads = one_grad_step(run, seed=2, lam=0.0)
    rho = float(scalars["argmax_density" if routes == "argmax" else "density"])
    assert rho > 0.25
    np.testing.assert_allclose(float(scalars["budget"]), 10.0 * (rho - 0.2) ** 2, rtol=1e-4)
    np.testing.assert_allclose(float(jnp.mean(scalars["density_per_layer"])), rho, rtol=1e-5)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


def test_feedback_budget_differentiates_sampled_density_and_steers_by_argmax(tiny_model_dir):
    """budget_routes="feedback": the loss term is nu times the Gumbel routes' density (its
    value and gradient), while the multiplier's dual step reads the argmax routes' density."""
    run = tiny_config(tiny_model_dir, "objective.density_target=0.2", "objective.budget=dual",
                      "objective.per_layer=True", "objective.budget_routes=feedback")
    _, _, _, _, scalars, _ = one_grad_step(run, seed=3, lam=0.0)
    per_layer_argmax = np.asarray(scalars["density_per_layer"])
    setup = setup_run(run)
    inject(run, setup.model)
    perturb_routers(setup.model, 3)
    setup.model.train()
    batch = setup.val_batches[0]
    _, aux = forward_with_aux(setup.model, jnp.asarray(batch["input_ids"]),
                              jnp.asarray(batch["attention_mask"]))
    # The argmax routes do not depend on the Gumbel draw: recomputed on a fresh copy.
    np.testing.assert_allclose(per_layer_argmax, np.asarray(aux["argmax_density_per_layer"]),
                               rtol=1e-6)
    # The budget term is nu . rho_sampled: 0 at nu = 0, so the multiplier is the lever.
    assert float(scalars["budget"]) == 0.0
    # Sampled and argmax densities differ on perturbed routers: the choice is observable.
    assert abs(float(scalars["density"]) - float(scalars["argmax_density"])) > 1e-3


def test_feedback_budget_dual_step_uses_argmax_density(tiny_model_dir, tmp_path):
    """One trainer step: nu = max(0, 0 + eta (rho_argmax - target)) per layer, from the argmax
    densities the step reports, not the sampled ones."""
    run = tiny_config(tiny_model_dir, "train.steps=1", "checkpoint.every=1",
                      "objective.density_target=0.05", "objective.budget=dual",
                      "objective.dual_eta=3.0", "objective.budget_routes=feedback")
    setup = setup_run(run)
    inject(run, setup.model)
    perturb_routers(setup.model, 4)
    trainer = make_trainer(run, setup, check_mesh(run), str(tmp_path / "fb"), progress=False)
    try:
        outcome = trainer.train()
    finally:
        trainer.close()
    rho_argmax = outcome.last_metrics["argmax_density"]
    rho_sampled = outcome.last_metrics["density"]
    nu = float(np.asarray(setup.model.density_multiplier[...]))
    np.testing.assert_allclose(nu, max(0.0, 3.0 * (rho_argmax - 0.05)), rtol=1e-4)
    assert abs(nu - max(0.0, 3.0 * (rho_sampled - 0.05))) > 1e-4


@pytest.mark.parametrize("anneal", [0.0, 60.0])
def test_annealed_noise_vanishes_with_the_temperature(tiny_model_dir, anneal):
    """At tau = 0.5 the noise scale is (0.5 / tau_start)**gumbel_anneal: 0.5**60 ~ 1e-18
    leaves the argmax routes (training density = argmax density), 0 anneal keeps the noise."""
    from ultrametric_jax.surgery.attention import noise_scale
    from ultrametric_jax.surgery.inject import set_tau
    run = tiny_config(tiny_model_dir, f"surgery.gumbel_anneal={anneal}")
    assert noise_scale(run.surgery, 0.5) == pytest.approx(0.5 ** anneal)
    setup = setup_run(run)
    inject(run, setup.model)
    perturb_routers(setup.model, 5)
    set_tau(setup.model, 0.5)
    setup.model.train()
    batch = setup.val_batches[0]
    _, aux = forward_with_aux(setup.model, jnp.asarray(batch["input_ids"]),
                              jnp.asarray(batch["attention_mask"]))
    gap = abs(float(aux["density"]) - float(aux["argmax_density"]))
    if anneal:
        assert gap < 1e-6
    else:
        assert gap > 1e-3


def test_feedback_budget_needs_the_dual(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"budget_routes='feedback'.*needs budget='dual'"):
        tiny_config(tiny_model_dir, "objective.density_target=0.2",
                    "objective.budget=penalty", "objective.budget_routes=feedback")


def test_out_of_domain_corpora_are_evaluated_dense_against_surgical(tiny_model_dir, tmp_path):
    from ultrametric_jax.run import evaluate as evaluation
    from ultrametric_jax.run.pipeline import evaluate
    text = tmp_path / "prose.txt"
    text.write_text("".join(f"Paragraph {i}: the tree routes every token to a leaf. " * 3
                            + "\n\n" for i in range(400)))
    run = tiny_config(tiny_model_dir, f"eval.extra_corpora=stdlib,{text}",
                      "eval.extra_max_chars=40000")
    assert run.eval.extra_corpora == ("stdlib", str(text))
    setup = setup_run(run)
    # The oracle: the base model before any surgery, on the same held-out batches.
    want = {name: evaluation.perplexity(setup.model, batches)["perplexity"]
            for name, batches in setup.extra_batches.items()}
    inject(run, setup.model)
    perturb_routers(setup.model, 3)
    report = evaluate(run, setup, str(tmp_path / "work"), None, step=0)
    assert set(report.by_corpus) == {"stdlib", str(text)}
    for name, result in report.by_corpus.items():
        assert result["dense"]["perplexity"] == want[name]
        direct = evaluation.evaluate_surgical(setup.model, setup.extra_batches[name],
                                              run.surgery)
        assert result["surgical"]["perplexity"] == direct["perplexity"]
        assert result["surgical"]["density"] < 1.0          # the perturbed routes sparsify
    summary = report.summary()
    assert "stdlib: perplexity dense" in summary and report.to_dict()["by_corpus"]


def test_training_refuses_a_recall_form_it_does_not_compute(tiny_model_dir):
    run = tiny_config(tiny_model_dir, "objective.recall_weight=1", "objective.recall_form=kl")
    setup = setup_run(run)
    inject(run, setup.model)
    graphdef = nnx.split(setup.model, RouterParam, MUTABLE, ...)[0]
    with pytest.raises(ConfigError, match="objective.recall_form='kl': training computes the "
                                        "'log_mass' recall"):
        make_grad_fn(graphdef, run.objective)
