"""JAX Mamba2 and attention vs independent float64 NumPy ports that load the same weights.

MaxText `*_vs_reference_test.py` style: every parameter is randomised (no ones or zeros left from
initialisation), the JAX weights are converted to the reference layout (`fused_from_jax` pins the
documented mamba_ssm fused layout), and both sides run on the same packed inputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close

from configs import tiny
from tests.reference.attention_numpy import attention_forward, segment_positions, weights_from_jax
from tests.reference.mamba2_numpy import fused_from_jax, mamba2_forward
from turbos_jax.config import ModelConfig
from turbos_jax.layers.attention import Attention
from turbos_jax.layers.mamba2 import Mamba2

BATCH, LENGTH = 2, 37  # 37: not a multiple of any chunk size used here
# Row 0: three packed documents; row 1: two documents then padding (segment 0).
SEGMENTS = np.array([[1] * 9 + [2] * 17 + [3] * 11, [1] * 20 + [2] * 12 + [0] * 5], np.int32)


def _cfg(dtype=jnp.float32, **changes) -> ModelConfig:
    cfg = ModelConfig.from_config(tiny.get_config().model)
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=jnp.float32, **changes)


def _randomize(module: nnx.Module, seed: int) -> None:
    """Replaces every nnx.Param with random values of a sensible scale for its role."""
    state = nnx.state(module, nnx.Param)
    rng = np.random.default_rng(seed)
    seen = set()

    def new_value(path, leaf):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = "/".join(k for k in keys if k != "value")  # Variables add a trailing "value" key
        shape = leaf.shape
        seen.add(name)
        if name.endswith("A_log"):  # A = -exp(A_log) in -[1, 16], as mamba_ssm's init range
            v = np.log(rng.uniform(1.0, 16.0, shape))
        elif name.endswith("dt_bias"):  # softplus(dt_bias) in [1e-3, 1e-1]
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
            v = dt + np.log(-np.expm1(-dt))
        elif "norm" in name:  # norm scales: around one, but not ones
            v = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name == "D":
            v = rng.standard_normal(shape)
        elif "conv1d" in name:
            v = 0.4 * rng.standard_normal(shape)
        else:  # projections: unit-scale outputs for unit-scale inputs
            v = rng.standard_normal(shape) / np.sqrt(shape[0])
        return jnp.asarray(v, leaf.dtype)

    nnx.update(module, jax.tree_util.tree_map_with_path(new_value, state))
    assert seen, "no parameters found"


def _build(cls, cfg: ModelConfig, seed: int) -> nnx.Module:
    """The module with random parameters; built abstractly, since eager init compiles op by op."""
    module = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    _randomize(module, seed)
    _check_params_randomized(module)
    return module


@nnx.jit
def _apply(module, *args):
    return module(*args)


def _inputs(d_model: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, LENGTH, d_model)).astype(np.float32)


def _check_params_randomized(module):
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param)):
        arr = np.asarray(leaf)
        assert not np.all(arr == 1.0) and not np.all(arr == 0.0), path


# ----------------------------------------------------------------------------- Mamba2


def _mamba_case(cfg: ModelConfig, seed: int):
    mixer = _build(Mamba2, cfg, seed)
    x = _inputs(cfg.d_model, seed + 1)
    got = _apply(mixer, jnp.asarray(x), jnp.asarray(SEGMENTS))
    want = mamba2_forward(
        x,
        fused_from_jax(mixer),
        heads=cfg.mamba_heads,
        head_dim=cfg.mamba_head_dim,
        groups=cfg.mamba_groups,
        d_state=cfg.mamba_d_state,
        eps=cfg.norm_eps,
        dt_limit=cfg.mamba_dt_limit,
        seq_idx=SEGMENTS,
    )
    return got, want


MAMBA_CASES = {
    "tiny_groups2": {},  # one chunk of 32 plus a partial one
    "groups1_dt_limit": dict(mamba_groups=1, mamba_dt_limit=(0.01, 0.05), mamba_chunk=16),
    "groups4_chunk8": dict(mamba_heads=8, mamba_head_dim=8, mamba_d_state=8, mamba_groups=4, mamba_chunk=8),
}


@pytest.mark.parametrize("name", list(MAMBA_CASES))
def test_mamba2_matches_numpy_port(name):
    got, want = _mamba_case(_cfg(**MAMBA_CASES[name]), seed=len(name))
    assert got.dtype == jnp.float32
    assert_close(got, want, 5e-6)  # measured 2.3e-7 to 6.7e-7 of max |ref| over the cases


def test_mamba2_bf16_compute_close_to_numpy_port():
    got, want = _mamba_case(_cfg(jnp.bfloat16, mamba_chunk=16), seed=7)
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, 2e-2)  # bf16 rounding: measured 6.0e-3 (Mamba2), 5.8e-3 (attention)


def test_fused_layout_shapes():
    cfg = _cfg()
    w = fused_from_jax(_build(Mamba2, cfg, 0))
    h, p, g, n, k, d = (
        cfg.mamba_heads,
        cfg.mamba_head_dim,
        cfg.mamba_groups,
        cfg.mamba_d_state,
        cfg.mamba_conv,
        cfg.d_model,
    )
    assert w["in_proj_weight"].shape == (2 * h * p + 2 * g * n + h, d)
    assert w["conv1d_weight"].shape == (h * p + 2 * g * n, 1, k)
    assert w["conv1d_bias"].shape == (h * p + 2 * g * n,)
    assert w["norm_weight"].shape == (h * p,)
    assert w["out_proj_weight"].shape == (d, h * p)
    assert all(w[name].shape == (h,) for name in ("dt_bias", "A_log", "D"))


def test_mamba2_port_segments_are_independent():
    """Sanity check of the port itself: a packed row equals its documents run one by one."""
    cfg = _cfg()
    w = fused_from_jax(_build(Mamba2, cfg, 3))
    kw = dict(
        heads=cfg.mamba_heads,
        head_dim=cfg.mamba_head_dim,
        groups=cfg.mamba_groups,
        d_state=cfg.mamba_d_state,
        eps=cfg.norm_eps,
    )
    x = _inputs(cfg.d_model, 4)[:1]
    packed = mamba2_forward(x, w, seq_idx=SEGMENTS[:1], **kw)
    for s in (1, 2, 3):
        cols = SEGMENTS[0] == s
        alone = mamba2_forward(x[:, cols], w, **kw)
        np.testing.assert_allclose(packed[:, cols], alone, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- attention


def _attention_case(cfg: ModelConfig, seed: int):
    attn = _build(Attention, cfg, seed)
    x = _inputs(cfg.d_model, seed + 1)
    positions = jnp.asarray(segment_positions(SEGMENTS), jnp.int32)
    got = _apply(attn, jnp.asarray(x), jnp.asarray(SEGMENTS), positions)
    want = attention_forward(
        x,
        weights_from_jax(attn),
        SEGMENTS,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta,
        rope_alpha=cfg.rope_alpha,
        eps=cfg.norm_eps,
        qk_norm=cfg.qk_norm,
    )
    return got, want


ATTENTION_CASES = {
    "gqa_alpha50": dict(rope_alpha=50.0),
    "mqa_theta100": dict(num_kv_heads=1, rope_theta=100.0),
    "mha_head8_alpha1000": dict(num_heads=8, num_kv_heads=8, head_dim=8, rope_alpha=1000.0),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_matches_numpy_port(name):
    got, want = _attention_case(_cfg(**ATTENTION_CASES[name]), seed=len(name))
    assert got.dtype == jnp.float32
    assert_close(got, want, 5e-6)  # measured 2.3e-7 to 6.7e-7 of max |ref| over the cases


def test_attention_bf16_compute_close_to_numpy_port():
    got, want = _attention_case(_cfg(jnp.bfloat16, rope_alpha=50.0), seed=11)
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, 2e-2)  # bf16 rounding: measured 6.0e-3 (Mamba2), 5.8e-3 (attention)
