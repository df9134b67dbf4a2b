"""The model with `kernel_impl="pallas"` (the kernels in interpret mode on CPU) equals the pure-XLA
model, alone and on a mesh (kernels wrapped in shard_map), and compiles for a TPU slice with the
Mosaic kernels in the program."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import training_batch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.model import TurbosModel
from turbos_jax.step import loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(cfg, b=4, l=24):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    seg = np.ones((b, l), np.int32)
    seg[1, 9:] = 2  # two documents in row 1: the kernels' state resets
    seg[2, 20:] = 0  # padding
    return training_batch(tokens, seg)


def _loss_and_grads(cfg, params, batch, mesh=None):
    graphdef = nnx.graphdef(TurbosModel(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, graphdef, b), has_aux=True))
    if mesh is None:
        return fn(params, batch)
    with jax.set_mesh(mesh):
        return fn(
            jax.device_put(params, sharding.named_shardings(params, mesh)),
            jax.device_put(batch, NamedSharding(mesh, P(("data", "expert")))),
        )


# Measured (gradients up to ~1e-2): max |diff| 2.2e-8 alone, 4.1e-8 on the 2x2x2 mesh.
def _close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b
    )


@pytest.mark.parametrize("capacity_factor", [1.5, 0.0], ids=["capacity", "dropless"])
def test_pallas_model_matches_xla(capacity_factor):
    cfg = dataclasses.replace(
        ModelConfig.from_config(tiny.get_config().model),
        layout="AFMF",
        mamba_chunk=8,
        capacity_factor=capacity_factor,
    )
    params = nnx.split(TurbosModel(cfg, rngs=nnx.Rngs(0)))[1]
    batch = _batch(cfg)
    (ref_loss, _), ref_grads = _loss_and_grads(cfg, params, batch)
    pallas = dataclasses.replace(cfg, kernel_impl="pallas")
    (loss, _), grads = _loss_and_grads(pallas, params, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)  # measured 0 / 8.5e-8
    _close(grads, ref_grads)


def test_pallas_model_on_a_mesh_matches_one_device():
    cfg = dataclasses.replace(
        ModelConfig.from_config(tiny.get_config().model),
        layout="AFMF",
        mamba_chunk=8,
        capacity_factor=0.0,
        kernel_impl="pallas",
    )
    params = nnx.split(TurbosModel(cfg, rngs=nnx.Rngs(0)))[1]
    batch = _batch(cfg)
    (ref_loss, _), ref_grads = _loss_and_grads(dataclasses.replace(cfg, kernel_impl="xla"), params, batch)
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "model": 2, "context": 1}, devices=jax.devices()[:8])
    (loss, _), grads = _loss_and_grads(cfg, params, batch, mesh)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)  # measured 0 / 8.5e-8
    _close(grads, ref_grads)


def test_tiny_train_step_compiles_for_tpu_with_mosaic_kernels():
    from tpu_aot import skip_without_libtpu

    skip_without_libtpu()  # installed (the test extra): a failed compile fails the test
    env = dict(os.environ, XLA_FLAGS="")
    if os.environ.get("TURBOS_TEST_LIBTPU_PATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            [os.environ["TURBOS_TEST_LIBTPU_PATH"], env.get("PYTHONPATH", "")]
        )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "turbos_jax.aot",
            "--config=configs/tiny.py",
            "--topology=v5p:2x2x1",
            "--json",
            "--config.mesh.data=1",
            "--config.mesh.expert=2",
            "--config.mesh.model=2",
            "--config.model.kernel_impl=auto",
            "--config.model.capacity_factor=0.0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["kernel_impl"] == "pallas"
    # Per Mamba2 layer: the scan's forward and backward; per MoE layer: gathers and combines.
    assert r["mosaic_kernel_calls"] >= 4, r
    assert r["fits"] is True
