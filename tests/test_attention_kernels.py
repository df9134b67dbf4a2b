"""Causal packed-segment GQA attention (`pallas_kernels.attention`) against the dense ground truth.

* Blockwise reference (the `xla` path, the CPU path): outputs and dq, dk, dv vs
  `reference.attention_dense` (full fp32 scores, autodiff) over lengths not a multiple of the
  block, shorter than a block, G = 1 and G > 1, packed documents with resets inside blocks and on
  block boundaries, padding (segment 0), fp32 and bf16.
* Rows with no visible key (impossible through the op, where a query always sees itself; forced
  here by patching the mask): zero output, zero and finite gradients.
* Negative controls: a mask letting one future key through, and a wrong logsumexp saved for the
  backward, each make the comparison fail.
* Memory: the compiled forward + backward at L = 8192 needs far less temp memory than one L x L
  fp32 score matrix, and grows linearly with L.
* TPU (splash) and GPU (JAX's Triton flash attention) wrappers in Pallas interpret mode on CPU
  against the dense attention; splash compiled ahead of time for a v5p chip (tests/tpu_aot.py)
  with its Mosaic calls; the Triton path exported for CUDA; on a real GPU, the same numerics.
* The tiny model's loss and gradients with the blockwise attention equal the dense attention's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import GPU_SKIP_REASON, assert_close, gpu_available, training_batch

import pallas_kernels.attention as attention_pkg
from pallas_kernels.attention import kernel, reference
from pallas_kernels.attention import ops as attention_ops
from pallas_kernels.attention.reference import BlockSizes

# Max error relative to max |ref| (tests/helpers.py). Measured over CASES (2026-11-26, XLA:CPU):
# fp32 outputs 2.7e-7, gradients 5.6e-7; bf16 outputs 6.2e-3, gradients 6.0e-3 (about 1.5 bf16
# ulps: p and ds are rounded to bf16 before the matmuls, per block here and per row in the dense).
TOL = {jnp.float32: 5e-6, jnp.bfloat16: 2e-2}
# On a GPU the Triton kernel's fp32 dots may run as TF32 (10-bit mantissa): not yet measured.
GPU_TOL = {jnp.float32: 5e-3, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 2
    l: int = 80
    h: int = 4
    kv: int = 2
    dh: int = 16
    block_q: int = 16
    block_k: int = 16
    segments: str = "packed"  # "one", "packed" (resets inside and on block boundaries), "padded"


CASES = [
    Case("ragged_L_gqa"),  # 80 = 5 blocks of 16
    Case("L_not_multiple", l=75, block_q=16, block_k=32),
    Case("L_shorter_than_block", l=13, block_q=64, block_k=64),
    Case("mha_G1", h=3, kv=3, l=40, block_q=8, block_k=24),
    Case("G4_one_segment", h=8, kv=2, segments="one", block_q=32, block_k=16),
    Case("padding_segments", l=70, segments="padded", block_q=24, block_k=8),
    Case("single_block", l=48, block_q=512, block_k=512),
]


def _segments(case: Case) -> np.ndarray:
    seg = np.ones((case.b, case.l), np.int32)
    if case.segments == "packed":
        seg[0, 11:] = 2  # reset inside a block
        seg[0, 32:] = 3  # reset on a block boundary (block 16 and 32)
        seg[-1, 16:] = 5
        seg[-1, 47:] = 6
    elif case.segments == "padded":
        seg[0, 30:] = 2
        seg[0, 55:] = 0  # right padding is segment 0 (the model's convention)
        seg[-1, 40:] = 0
    return seg


def _inputs(case: Case, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (case.b, case.l, case.h, case.dh), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (case.b, case.l, case.kv, case.dh), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (case.b, case.l, case.kv, case.dh), jnp.float32).astype(dtype)
    d_out = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)
    if case.segments == "one":
        seg = np.ones((case.b, case.l), np.int32)
    else:
        seg = _segments(case)
    return q, k, v, jnp.asarray(seg), d_out


def _out_and_grads(fn, q, k, v, seg, d_out):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return (out, *vjp(d_out))


def _errors(fn, case, dtype):
    q, k, v, seg, d_out = _inputs(case, dtype)
    got = _out_and_grads(jax.jit(fn), q, k, v, seg, d_out)
    # a fresh function each time: a cached trace would not see the tests' patched mask
    want = _out_and_grads(jax.jit(lambda *a: reference.attention_dense(*a)), q, k, v, seg, d_out)
    return [(n, a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)]


def _check(fn, case, dtype, tol=TOL):
    for name, got, want in _errors(fn, case, dtype):
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert_close(np.asarray(got, np.float32), np.asarray(want, np.float32), tol[dtype], name)


def _blockwise(case):
    return lambda q, k, v, seg: reference.attention(q, k, v, seg, BlockSizes(case.block_q, case.block_k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_blockwise_matches_dense(case, dtype):
    _check(_blockwise(case), case, dtype)


def test_op_xla_and_pallas_on_cpu_are_the_blockwise_reference():
    case = Case("op", l=40)
    for impl in ("xla", "pallas"):
        fn = lambda q, k, v, seg, impl=impl: attention_ops.attention(
            q, k, v, seg, impl=impl, block_sizes=BlockSizes(16, 16)
        )
        _check(fn, case, jnp.float32)
    with pytest.raises(ValueError, match="impl"):
        attention_ops.attention(*_inputs(case, jnp.float32)[:4], impl="triton")


# --- rows with no visible key ----------------------------------------------------------------------


def _hide_padding_rows(q_seg, q_idx, k_seg, k_idx):
    """The real mask, except that queries of segment 0 see nothing (fully masked rows)."""
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return same & (q_idx[:, None] >= k_idx[None, :])


def test_fully_masked_rows_give_zero_output_and_gradients(monkeypatch):
    monkeypatch.setattr(reference, "visible", _hide_padding_rows)
    case = Case("padded", l=70, segments="padded", block_q=16, block_k=16)
    q, k, v, seg, d_out = _inputs(case, jnp.float32)
    out, dq, dk, dv = _out_and_grads(_blockwise(case), q, k, v, seg, d_out)
    empty = np.asarray(seg) == 0
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.isfinite(np.asarray(x)).all(), name
    assert not np.asarray(out)[empty].any() and not np.asarray(dq)[empty].any()
    assert not np.asarray(dk)[empty].any() and not np.asarray(dv)[empty].any()  # keys nobody sees
    for name, got, want in _errors(_blockwise(case), case, jnp.float32):  # dense agrees elsewhere
        assert_close(got, want, TOL[jnp.float32], name)


# --- negative controls --------------------------------------------------------------------------


def _future_leak(q_seg, q_idx, k_seg, k_idx):
    """Broken: each query also sees the next key of its segment."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return same & (q_idx[:, None] + 1 >= k_idx[None, :])


def test_negative_control_broken_mask_fails(monkeypatch):
    case = Case("ctl", l=40)
    errors = _errors(_blockwise(case), case, jnp.float32)  # dense built before the patch
    monkeypatch.setattr(reference, "visible", _future_leak)
    q, k, v, seg, d_out = _inputs(case, jnp.float32)
    broken = _out_and_grads(_blockwise(case), q, k, v, seg, d_out)
    for (name, _, want), got in zip(errors, broken, strict=True):
        with pytest.raises(AssertionError, match="max error"):
            assert_close(got, want, TOL[jnp.float32], name)


def test_negative_control_wrong_lse_in_backward_fails(monkeypatch):
    forward = reference._forward
    monkeypatch.setattr(reference, "_forward", lambda *a: (lambda o, lse: (o, lse + 0.1))(*forward(*a)))
    case = Case("ctl_lse", l=40)
    errors = _errors(_blockwise(case), case, jnp.float32)
    assert_close(errors[0][1], errors[0][2], TOL[jnp.float32], "out")  # the forward is untouched
    for name, got, want in errors[1:]:
        with pytest.raises(AssertionError, match="max error"):
            assert_close(got, want, TOL[jnp.float32], name)


# --- memory ----------------------------------------------------------------------------------------


def _temp_bytes(fn, l, b=1, h=4, kv=2, dh=16):
    """Compiled temp memory of forward + backward at the tiny config's attention shapes."""
    sds = jax.ShapeDtypeStruct
    args = (
        sds((b, l, h, dh), jnp.float32),
        sds((b, l, kv, dh), jnp.float32),
        sds((b, l, kv, dh), jnp.float32),
    )
    seg = sds((b, l), jnp.int32)
    loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(*args, seg).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
    """Measured (2026-11-26, XLA:CPU, blocks 512 x 512): 21.7 MiB at L=4096, 22.8 MiB at L=8192 (a
    few (H, 512, 512) fp32 blocks of 4 MiB plus O(L) buffers of L * H * Dh), against 1 GiB for one
    (H, L, L) fp32 score matrix at 8192; the dense attention's compiled temp is 4.0 GiB there."""
    l, h, dh, block = 8192, 4, 16, reference.DEFAULT_BLOCK_SIZES.block_q
    small, big = _temp_bytes(reference.attention, l // 2), _temp_bytes(reference.attention, l)
    scores = l * l * h * 4  # one fp32 (H, L, L) score matrix
    assert big < 8 * h * block * block * 4 + 32 * l * h * dh * 4, (big, scores)  # O(L x block)
    assert big < 2.5 * small, (small, big)  # doubling L at most ~doubles it (quadratic would be 4x)
    assert _temp_bytes(reference.attention_dense, l) > scores  # the dense one holds L x L


# --- TPU: splash attention -------------------------------------------------------------------------


def test_tpu_splash_wrapper_interpret_matches_dense():
    case = Case("splash", b=1, l=200, h=4, kv=2, dh=16)  # padded to 256, two 128 blocks
    fn = lambda q, k, v, seg: kernel.tpu_attention(
        q, k, v, seg, block_sizes=BlockSizes(128, 128), interpret=True
    )
    _check(fn, case, jnp.float32)


@pytest.mark.parametrize(
    "shape",
    [(1, 24, 4, 2, 16, jnp.float32), (1, 4096, 8, 1, 128, jnp.bfloat16)],
    ids=["tiny", "turbos_per_device"],
)
def test_lowers_for_tpu(shape):
    """Forward and backward compile for v5p: splash's forward, dq and dkv Mosaic kernels. The
    TurboS shape is one device's share under 8-way tensor parallelism (8 query heads, 1 KV head)."""
    from tpu_aot import compile_for_tpu, count_mosaic_calls

    b, l, h, kv, dh, dt = shape
    sds = jax.ShapeDtypeStruct

    def fwd_bwd(q, k, v, seg):
        loss = lambda q, k, v: attention_ops.attention(q, k, v, seg, impl="pallas").astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    args = (sds((b, l, h, dh), dt), sds((b, l, kv, dh), dt), sds((b, l, kv, dh), dt), sds((b, l), jnp.int32))
    hlo = compile_for_tpu(fwd_bwd, *args)
    assert count_mosaic_calls(hlo) == 3, count_mosaic_calls(hlo)


# --- GPU: JAX's Triton flash attention -------------------------------------------------------------

TRITON_CALL = "__gpu$xla.gpu.triton"


def test_gpu_triton_wrapper_interpret_matches_dense():
    case = Case("triton", b=1, l=150, h=4, kv=2, dh=16)  # padded to 256 (block 128), G = 2
    _check(lambda q, k, v, seg: kernel.gpu_attention(q, k, v, seg, interpret=True), case, jnp.float32)


def test_lowers_for_cuda():
    b, l, h, kv, dh = 1, 2048, 8, 1, 128
    sds = jax.ShapeDtypeStruct
    args = (
        sds((b, l, h, dh), jnp.bfloat16),
        sds((b, l, kv, dh), jnp.bfloat16),
        sds((b, l, kv, dh), jnp.bfloat16),
        sds((b, l), jnp.int32),
    )

    def fwd_bwd(q, k, v, seg):
        loss = lambda q, k, v: attention_ops.attention(q, k, v, seg, impl="pallas").astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    disabled = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=disabled)(*args)
    text = exported.mlir_module()
    # forward, backward preprocessing (delta) and the fused dq/dkv backward kernel
    assert text.count(TRITON_CALL) >= 3, text.count(TRITON_CALL)
    assert "mha_forward" in text


@pytest.mark.skipif(not gpu_available(), reason=GPU_SKIP_REASON)
class TestOnGpu:
    """The op with impl="pallas" on a GPU (the Triton kernel compiled) against the dense attention."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.name)
    def test_matches_dense(self, case, dtype):
        gpu = jax.devices("gpu")[0]
        with jax.default_device(gpu):
            fn = lambda q, k, v, seg: attention_ops.attention(q, k, v, seg, impl="pallas")
            _check(fn, case, dtype, GPU_TOL)

    def test_turbos_per_device_shape(self):
        case = Case("turbos_device", b=1, l=2048, h=8, kv=1, dh=128, segments="packed")
        with jax.default_device(jax.devices("gpu")[0]):
            fn = lambda q, k, v, seg: attention_ops.attention(q, k, v, seg, impl="pallas")
            _check(fn, case, jnp.bfloat16, GPU_TOL)


# --- model level -----------------------------------------------------------------------------------


def _dense_attend_sequence(self, q, k, v, segment_ids):
    return reference.attention_dense(q, k, v, segment_ids)


def test_tiny_model_loss_and_gradients_match_dense_attention(monkeypatch):
    """Measured (fp32, blocks 16 x 8 over 40 tokens): loss equal (difference 0), gradients 5.2e-7
    of max |ref| (4.3e-8 absolute)."""
    from configs import tiny
    from turbos_jax.config import ModelConfig
    from turbos_jax.layers import attention as attention_layer
    from turbos_jax.model import TurbosModel
    from turbos_jax.step import loss_fn

    cfg = ModelConfig.from_config(tiny.get_config().model)
    b, l = 3, 40
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    seg = np.ones((b, l), np.int32)
    seg[1, 13:] = 2
    seg[2, 30:] = 0
    batch = training_batch(tokens, seg)
    model = TurbosModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def run():
        fn = jax.jit(jax.value_and_grad(lambda p, bt: loss_fn(p, graphdef, bt), has_aux=True))
        (loss, _), grads = fn(params, batch)
        return float(loss), grads

    blockwise_attention = attention_pkg.attention
    monkeypatch.setattr(  # small blocks so the 40 tokens span several of them (the layer's call)
        attention_pkg,
        "attention",
        lambda *a, **kw: blockwise_attention(*a, **{**kw, "block_sizes": BlockSizes(16, 8)}),
    )
    loss, grads = run()
    monkeypatch.setattr(attention_layer.Attention, "attend_sequence", _dense_attend_sequence)
    loss_dense, grads_dense = run()
    assert abs(loss - loss_dense) <= 1e-6 * abs(loss_dense), (loss, loss_dense)
    flat, flat_dense = jax.tree.leaves(grads), jax.tree.leaves(grads_dense)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in flat_dense)
    err = max(
        float(np.abs(np.asarray(a) - np.asarray(d)).max()) for a, d in zip(flat, flat_dense, strict=True)
    )
    assert err <= 5e-6 * scale, (err, scale)
