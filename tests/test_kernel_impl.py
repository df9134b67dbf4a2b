"""`kernel_impl="auto"`: Pallas kernels on TPUs and on GPUs that can run them, XLA elsewhere."""

from __future__ import annotations

import types
import warnings

import jax
import pytest

import pallas_kernels
from pallas_kernels import resolve_impl


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes jax.devices()[0] look like a GPU of the compute capability the test sets."""

    def install(capability, kind="NVIDIA test GPU"):
        device = types.SimpleNamespace(platform="gpu", compute_capability=capability, device_kind=kind)
        monkeypatch.setattr(jax, "devices", lambda *a, **k: [device])
        pallas_kernels._gpu_runs_pallas.cache_clear()

    yield install
    pallas_kernels._gpu_runs_pallas.cache_clear()


def test_auto_by_platform():
    assert resolve_impl("auto", "tpu") == "pallas"
    assert resolve_impl("auto", "cpu") == "xla"
    assert resolve_impl("xla", "tpu") == "xla" and resolve_impl("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="kernel impl 'triton' is not available"):
        resolve_impl("triton")


@pytest.mark.parametrize("capability", ["8.0", "9.0", "12.0"])
def test_auto_uses_kernels_on_ampere_and_later(fake_gpu, capability):
    fake_gpu(capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("auto", "gpu") == "pallas"


def test_auto_falls_back_to_xla_on_older_gpus_with_one_warning(fake_gpu):
    fake_gpu("7.5", kind="Tesla T4")  # a free Colab runtime
    with pytest.warns(UserWarning) as caught:
        assert resolve_impl("auto", "gpu") == "xla"
        assert resolve_impl("auto", "cuda") == "xla"  # decided once per process
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "kernel_impl='auto': Tesla T4 has compute capability 7.5; the Pallas GPU kernels need 8.0 "
        "or later, so the XLA reference ops run instead"
    )
    assert resolve_impl("pallas", "gpu") == "pallas"  # an explicit choice is kept


def test_auto_without_a_reported_capability_keeps_the_kernels(fake_gpu):
    fake_gpu(None)
    assert resolve_impl("auto", "gpu") == "pallas"
