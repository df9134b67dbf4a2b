"""MoE Pallas kernels (pallas_kernels.moe, impl="pallas") against the XLA reference.

CPU runs every kernel in Pallas interpret mode, whose uninitialised outputs are NaN-filled, so a row
the kernel forgets to write fails the element-wise comparisons (and the explicit finiteness checks).
TPU lowering is checked by compiling for a v5p chip (tests/tpu_aot.py), CUDA lowering by exporting
for "cuda"; the real-GPU class runs only where JAX sees a GPU.
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import GPU_SKIP_REASON, gpu_available

from pallas_kernels import moe as ops  # noqa: E402
from pallas_kernels.moe import kernel, kernel_gpu, kernel_tpu  # noqa: E402

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _np(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


def _close(got, want, dtype, scale=1.0):
    got, want = _np(got), _np(want)
    assert np.isfinite(got).all(), "non-finite values (an unwritten row?)"
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _routing(rng, t, k, e, empty=(), no_expert_frac=0.15):
    """Top-k ids with distinct experts per token, experts in `empty` never chosen, and about
    `no_expert_frac` of the slots set to E ("no expert", as the layer does for padding tokens)."""
    allowed = np.array([x for x in range(e) if x not in empty])
    ids = np.stack([rng.permutation(allowed)[:k] for _ in range(t)]).astype(np.int32)
    ids[rng.uniform(size=ids.shape) < no_expert_frac] = e
    order, sizes = ops.sort_by_expert(jnp.asarray(ids), e)
    return ids, order, sizes


# =========================================================================== kernels, interpret mode
GATHER_CASES = [
    # n, m, k, d, dtype, weighted, dot
    (7, 13, 1, 200, jnp.float32, False, False),  # pure gather, d % 128 != 0, M % R != 0
    (9, 11, 3, 256, jnp.bfloat16, True, True),  # odd N in bf16 (row-pair view padding)
    (12, 10, 2, 384, jnp.float32, False, True),  # unweighted sum (permute's transpose)
]


@pytest.mark.parametrize("n,m,k,d,dtype,weighted,dot", GATHER_CASES)
@pytest.mark.parametrize("which", ["tpu", "gpu"])
def test_gather_combine_kernels_interpret(which, n, m, k, d, dtype, weighted, dot):
    rng = np.random.default_rng(n * m + d)
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    idx = jnp.asarray(rng.integers(0, n, m * k), jnp.int32)
    w = jnp.asarray(rng.uniform(-1, 1, (m, k)), jnp.float32) if weighted else None
    other = jnp.asarray(rng.standard_normal((m, d)), dtype) if dot else None
    if which == "tpu":
        # Small blocks so several row blocks (and, for d=384, several column panels) run.
        narrowest = 128 if d % 128 == 0 else d
        blk = kernel_tpu.TpuRowBlock(rows=8, panel_bytes=2 * (n + 1) * narrowest * x.dtype.itemsize)
        got = kernel_tpu.gather_combine(x, idx, w, other, top_k=k, block=blk, interpret=True)
    else:
        blk = kernel_gpu.GpuRowBlock(rows=8, cols=128)
        got = kernel_gpu.gather_combine(x, idx, w, other, top_k=k, block=blk, interpret=True)
    want = kernel.gather_combine_xla(x, idx, w, other, top_k=k)
    if dot:
        _close(got[1], want[1], jnp.float32, scale=10)
        got, want = got[0], want[0]
    assert got.dtype == x.dtype and got.shape == (m, d)
    if k == 1 and not weighted:
        np.testing.assert_array_equal(_np(got), _np(want))  # a gather is a bit-exact copy
    else:
        _close(got, want, dtype)


def test_tpu_column_tile_and_fits():
    assert kernel_tpu.column_tile(100, 200, 4, 1 << 30) == 200
    assert kernel_tpu.column_tile(100, 5120, 2, 2 * 100 * 1024 * 2) == 1024
    assert kernel_tpu.column_tile(10**6, 200, 4, 1 << 20) is None
    assert not kernel_tpu.fits((8, 128), jnp.float16)
    assert kernel_tpu.fits((16384, 5120), jnp.bfloat16)


# ================================================================== ops: impl="pallas" vs impl="xla"
OP_CASES = [
    # t, k, e, d, dtype, empty experts
    (9, 2, 5, 200, jnp.float32, (1,)),
    (16, 3, 6, 256, jnp.bfloat16, (0, 4)),
]


@pytest.mark.parametrize("t,k,e,d,dtype,empty", OP_CASES)
def test_permute_unpermute_values_and_vjp(t, k, e, d, dtype, empty):
    rng = np.random.default_rng(t + d)
    _, order, _ = _routing(rng, t, k, e, empty)
    x = jnp.asarray(rng.standard_normal((t, d)), dtype)
    ys = jnp.asarray(rng.standard_normal((t * k, d)), dtype)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)

    def both(impl):
        perm = jax.jit(lambda x: ops.permute(x, order, k, impl=impl))
        unperm = jax.jit(lambda ys, w: ops.unpermute(ys, order, w, impl=impl))
        xs, perm_vjp = jax.vjp(perm, x)
        out, unperm_vjp = jax.vjp(unperm, ys, w)
        ct_rng = np.random.default_rng(1)
        dxs = jnp.asarray(ct_rng.standard_normal(xs.shape), dtype)
        dout = jnp.asarray(ct_rng.standard_normal(out.shape), dtype)
        return (xs, out, *perm_vjp(dxs), *unperm_vjp(dout))

    got, want = both("pallas"), both("xla")
    np.testing.assert_array_equal(_np(got[0]), _np(want[0]))  # permute is a bit-exact gather
    for g, r in zip(got[1:], want[1:], strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        _close(g, r, dtype, scale=4)


GMM_CASES = [
    # sizes (m = sum + trailing "no expert" rows), K, N, dtype
    ([3, 0, 5, 1], 4, 200, 130, jnp.float32),  # empty expert, trailing rows, K/N not 128-multiples
    ([0, 7, 0, 2], 0, 128, 256, jnp.bfloat16),
    ([0, 0, 0], 6, 128, 128, jnp.float32),  # nothing routed: all zero
]


@pytest.mark.parametrize("sizes,trailing,kd,n,dtype", GMM_CASES)
def test_grouped_matmul_values_and_vjp(sizes, trailing, kd, n, dtype):
    rng = np.random.default_rng(sum(sizes) + kd + n)
    m, e = sum(sizes) + trailing, len(sizes)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((m, kd)), dtype)
    rhs = jnp.asarray(rng.standard_normal((e, kd, n)) / np.sqrt(kd), dtype)
    ct = jnp.asarray(rng.standard_normal((m, n)), dtype)

    def run(impl):
        f = jax.jit(lambda a, b: ops.grouped_matmul(a, b, group_sizes, impl=impl))
        out, vjp = jax.vjp(f, lhs, rhs)
        return (out, *vjp(ct))

    got, want = run("pallas"), run("xla")
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        _close(g, r, dtype, scale=4)
    # "No expert" rows of the output and of d lhs are exactly zero.
    assert not np.any(_np(got[0])[sum(sizes) :]) and not np.any(_np(got[1])[sum(sizes) :])


def test_dropless_ffn_chain_matches_xla():
    """permute -> three grouped matmuls with silu -> unpermute, forward and all gradients."""
    t, k, e, d, f = 10, 2, 4, 136, 72
    rng = np.random.default_rng(7)
    ids, order, sizes = _routing(rng, t, k, e, empty=(2,))
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.float32) for _ in range(2))
    wo = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.float32)

    def ffn(impl):
        def fn(x, w, wg, wu, wo):
            xs = ops.permute(x, order, k, impl=impl)
            h = jax.nn.silu(ops.grouped_matmul(xs, wg, sizes, impl=impl))
            h = h * ops.grouped_matmul(xs, wu, sizes, impl=impl)
            return ops.unpermute(ops.grouped_matmul(h, wo, sizes, impl=impl), order, w, impl=impl)

        out, vjp = jax.vjp(jax.jit(fn), x, w, wg, wu, wo)
        return (out, *vjp(jnp.asarray(np.random.default_rng(3).standard_normal(out.shape), jnp.float32)))

    for g, r in zip(ffn("pallas"), ffn("xla"), strict=True):
        _close(g, r, jnp.float32, scale=10)


def test_capacity_ops_accept_pallas():
    ids = jnp.asarray([[[0, 1], [1, 0], [1, 2]]], jnp.int32)
    pos = ops.capacity_positions(ids, 3)
    x = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4)
    got = ops.capacity_dispatch(x, ids, pos, 2, 3, impl="pallas")
    np.testing.assert_array_equal(got, ops.capacity_dispatch(x, ids, pos, 2, 3))
    g = jnp.ones((1, 3, 2))
    np.testing.assert_array_equal(
        ops.capacity_combine(got, ids, pos, g, 2, impl="pallas"), ops.capacity_combine(got, ids, pos, g, 2)
    )


# ========================================================================================= lowering
T, K, E, D, F = 512, 2, 16, 512, 256  # TurboS-like, small enough to compile quickly


def _op_fns():
    """Each op as (forward, loss) over bf16 operands, with routing computed from int ids."""

    def routing(ids):
        return ops.sort_by_expert(ids, E)

    def permute(x, ids):
        return ops.permute(x, routing(ids)[0], K, impl="pallas")

    def gmm(xs, ids, wg):
        return ops.grouped_matmul(xs, wg, routing(ids)[1], impl="pallas")

    def unpermute(ys, ids, w):
        return ops.unpermute(ys, routing(ids)[0], w, impl="pallas")

    s = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    return {
        "permute": (permute, (0,), (s((T, D), bf), s((T, K), jnp.int32))),
        "grouped_matmul": (gmm, (0, 2), (s((T * K, D), bf), s((T, K), jnp.int32), s((E, D, F), bf))),
        "unpermute": (unpermute, (0, 2), (s((T * K, D), bf), s((T, K), jnp.int32), s((T, K), jnp.float32))),
    }


def _loss(fn, argnums):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=argnums)


@pytest.mark.parametrize("op", ["permute", "grouped_matmul", "unpermute"])
def test_tpu_lowering_forward_and_grad(op):
    from tpu_aot import compile_for_tpu, count_mosaic_calls

    fn, argnums, args = _op_fns()[op]
    assert count_mosaic_calls(compile_for_tpu(fn, *args)) >= 1
    # The backward pass runs kernels too: more Mosaic calls than the forward alone.
    assert count_mosaic_calls(compile_for_tpu(_loss(fn, argnums), *args)) >= 2


@pytest.mark.parametrize("op", ["permute", "unpermute"])
def test_cuda_lowering_emits_triton(op):
    fn, argnums, args = _op_fns()[op]
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for f, want in ((fn, 1), (_loss(fn, argnums), 2)):
        text = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
        assert text.count("__gpu$xla.gpu.triton") >= want
        assert "tpu_custom_call" not in text


@pytest.mark.skipif(not gpu_available(), reason=GPU_SKIP_REASON)
class TestOnGpu:
    """Compiled Triton kernels and XLA's ragged_dot on a real GPU, against the reference."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_ffn_chain(self, dtype):
        t, k, e, d, f = 300, 2, 8, 640, 256
        rng = np.random.default_rng(0)
        _, order, sizes = _routing(rng, t, k, e, empty=(3,))
        dev = jax.devices("gpu")[0]
        x = jax.device_put(jnp.asarray(rng.standard_normal((t, d)), dtype), dev)
        w = jax.device_put(jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32), dev)
        wg = jax.device_put(jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype), dev)
        wo = jax.device_put(jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype), dev)

        def run(impl):
            def fn(x, w, wg, wo):
                xs = ops.permute(x, order, k, impl=impl)
                h = jax.nn.silu(ops.grouped_matmul(xs, wg, sizes, impl=impl))
                return ops.unpermute(ops.grouped_matmul(h, wo, sizes, impl=impl), order, w, impl=impl)

            out, vjp = jax.vjp(jax.jit(fn), x, w, wg, wo)
            return (out, *vjp(jnp.ones_like(out)))

        for g, r in zip(run("pallas"), run("xla"), strict=True):
            _close(g, r, dtype, scale=10)
