"""pallas_kernels/moe/tiled.py (the CPU grouped matmul) against `ragged_dot` (reference.py): outputs and
gradients over shapes, dtypes and group layouts (empty groups, groups sharing a tile, padding rows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from pallas_kernels.moe import ops, reference, tiled

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _sizes(rng, m, e, layout):
    if layout == "one_group":  # every row in the last group: one group spans every tile
        return np.eye(e, dtype=np.int32)[-1] * m
    used = m - int(rng.integers(0, m // 3 + 1)) if layout == "padding" else m
    sizes = rng.multinomial(used, np.ones(e) / e).astype(np.int32)
    if layout == "empty":
        sizes[[0, e // 2]] = 0
        sizes[-1] += m - sizes.sum()
    return sizes


@pytest.mark.parametrize("m,k,n,e", [(128, 64, 48, 8), (37, 16, 24, 5), (700, 32, 16, 8), (8, 8, 8, 4)])
@pytest.mark.parametrize("layout", ["random", "padding", "empty", "one_group"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_ragged_dot_with_gradients(m, k, n, e, layout, dtype):
    rng = np.random.default_rng(m * 31 + e)
    sizes = jnp.asarray(_sizes(rng, m, e, layout))
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), dtype)
    cotangent = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w, sizes).astype(jnp.float32) * cotangent)

    got, want = jax.jit(tiled.grouped_matmul)(x, w, sizes), reference.grouped_matmul(x, w, sizes)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got.astype(jnp.float32), want.astype(jnp.float32), TOL[dtype], "output")
    used = int(sizes.sum())
    assert not np.asarray(got[used:]).any()  # rows past the groups are zero, as with ragged_dot
    for g_got, g_want in zip(
        jax.grad(loss(tiled.grouped_matmul), (0, 1))(x, w),
        jax.grad(loss(reference.grouped_matmul), (0, 1))(x, w),
        strict=True,
    ):
        assert_close(g_got.astype(jnp.float32), g_want.astype(jnp.float32), TOL[dtype], "gradient")


def test_groups_sharing_a_tile_are_masked():
    """Negative control for the per-pair mask: two groups inside one 8-row tile, distinct weights."""
    x = jnp.ones((8, 2), jnp.float32)
    w = jnp.stack([jnp.full((2, 1), 1.0), jnp.full((2, 1), 10.0)])
    got = tiled.grouped_matmul(x, w, jnp.array([3, 5], jnp.int32))
    np.testing.assert_array_equal(np.asarray(got[:, 0]), [2, 2, 2, 20, 20, 20, 20, 20])


def test_row_tile_and_cpu_dispatch():
    assert [tiled.row_tile(m, 8) for m in (1, 64, 128, 1000, 100_000)] == [8, 8, 16, 128, 128]
    x, w, sizes = jnp.ones((16, 4)), jnp.ones((2, 4, 3)), jnp.array([9, 7], jnp.int32)
    hlo = jax.jit(lambda x, w: ops.grouped_matmul(x, w, sizes)).lower(x, w).as_text()
    # ragged_dot on CPU broadcasts the rows to every group: (2, 16, 4); the tiled path never does.
    assert (
        "2x16x4" in jax.jit(lambda x, w: reference.grouped_matmul(x, w, sizes)).lower(x, w).as_text()
    ) and ("2x16x4" not in hlo)
