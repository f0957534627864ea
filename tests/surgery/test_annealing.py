"""tau and lambda schedules against their closed forms."""
import jax
import numpy as np
import pytest

from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.annealing import lambda_schedule, tau_schedule


def test_exponential_tau_closed_form():
    cfg = SurgeryConfig(tau_start=1.0, tau_end=0.1, tau_steps=100)
    tau = tau_schedule(cfg)
    for t in (0, 1, 25, 50, 99, 100, 150, 10_000):
        expected = 1.0 * 0.1 ** (min(t, 100) / 100)
        np.testing.assert_allclose(float(tau(t)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(tau(50)), np.sqrt(0.1), rtol=1e-6)
    # Traceable (used inside a jitted train step).
    np.testing.assert_allclose(float(jax.jit(tau)(np.int32(25))), 0.1 ** 0.25, rtol=1e-6)


def test_degenerate_tau_schedules():
    assert float(tau_schedule(SurgeryConfig(tau_steps=0, tau_end=0.2))(5)) == pytest.approx(0.2)
    assert float(tau_schedule(SurgeryConfig(tau_start=0.3, tau_end=0.3))(7)) == pytest.approx(0.3)


def test_lambda_linear_ramp():
    lam = lambda_schedule(SurgeryConfig(lambda_max=0.8, lambda_ramp_steps=20))
    for t in (0, 5, 10, 20, 21, 1000):
        np.testing.assert_allclose(float(lam(t)), 0.8 * min(t / 20, 1.0), rtol=1e-6, atol=1e-7)
    const = lambda_schedule(SurgeryConfig(lambda_max=0.3, lambda_ramp_steps=0))
    np.testing.assert_allclose(float(const(0)), 0.3, rtol=1e-7)
