"""Backend selection: defaults per device, the TDM_R1_KERNELS override, one log line, clear errors."""

import logging

import pytest
import torch

from tdm_r1_kernels import dispatch, fused_renoise, fused_sampler_step


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    dispatch.reset()
    yield
    dispatch.reset()


def test_cpu_default_is_native_when_built(native_lib, caplog):
    with caplog.at_level(logging.INFO, logger="tdm_r1_kernels"):
        assert dispatch.resolve_backend(torch.device("cpu")) == "native"
        assert dispatch.resolve_backend(torch.device("cpu")) == "native"
    lines = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert len(lines) == 1 and "native" in lines[0]


def test_cpu_falls_back_to_reference_without_library(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "native_library_path", lambda: None)
    with caplog.at_level(logging.INFO, logger="tdm_r1_kernels"):
        assert dispatch.resolve_backend(torch.device("cpu")) == "reference"
    assert any("not built" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 5)
    x_tau, a, b = fused_renoise(x, torch.randn(2, 5), 0.2, 0.7)  # works with no native library at all
    assert x_tau.shape == x.shape


@pytest.mark.parametrize("choice", ["reference", "native", "triton"])
def test_env_override(monkeypatch, native_lib, choice):
    monkeypatch.setenv(dispatch.ENV_BACKEND, choice)
    assert dispatch.resolve_backend(torch.device("cpu")) == choice


def test_env_override_rejects_unknown(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cuda-graphs")
    with pytest.raises(ValueError, match="TDM_R1_KERNELS"):
        dispatch.resolve_backend(torch.device("cpu"))


def test_unusable_choices_are_errors(monkeypatch):
    monkeypatch.setattr(dispatch, "native_library_path", lambda: None)
    with pytest.raises(RuntimeError, match="make native"):
        dispatch.resolve_backend(torch.device("cpu"), "native")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.resolve_backend(torch.device("cpu"), "fast")


def test_float64_takes_the_float64_reference(native_lib, caplog):
    """No fused kernel computes in float64: float64 inputs run the reference (logged once), and the sampler step
    and re-noising keep float64 precision (exact samplers for numerical checks)."""
    with caplog.at_level(logging.INFO, logger="tdm_r1_kernels"):
        assert dispatch.resolve_backend(torch.device("cpu"), dtype=torch.float64) == "reference"
        assert dispatch.resolve_backend(torch.device("cpu"), dtype=torch.float64) == "reference"
        assert dispatch.resolve_backend(torch.device("cpu"), dtype=torch.float32) == "native"
    assert sum("float64" in r.getMessage() for r in caplog.records) == 1
    x, v, n = (torch.randn(3, 7, dtype=torch.float64) for _ in range(3))
    s, s_next, tau = 0.7, 0.3, 0.45
    step = fused_sampler_step(x, v, s, s_next, noise=n, tau=tau)
    a = (1 - tau) / (1 - s_next)
    b = (tau**2 - (a * s_next) ** 2) ** 0.5
    x_next = x - (s - s_next) * v
    assert torch.allclose(step.x_next, x_next, rtol=0, atol=1e-15)
    assert torch.allclose(step.x_tau, a * x_next + b * n, rtol=0, atol=1e-15)
    assert step.a.dtype == torch.float64 and torch.allclose(step.a, torch.full((3,), a, dtype=torch.float64))
    x_tau, _, _ = fused_renoise(x, n, s_next, tau)
    assert torch.allclose(x_tau, a * x + b * n, rtol=0, atol=1e-15)
