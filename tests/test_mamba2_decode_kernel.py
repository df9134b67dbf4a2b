"""Mamba2 decode state-update kernels (`pallas_kernels/mamba2/kernel_decode.py`).

* Interpret mode (CPU) vs `reference.state_update` in fp32, both kernels, small and TurboS head
  shapes, fp32 and bf16 x/B/C, single steps and a recurrence of several steps.
* Poisoning: interpret mode fills non-aliased outputs (y) with NaN before the kernel runs (checked
  below), so an element the kernel forgets to write fails the comparison. The aliased state starts
  as the old state, which differs from the new one everywhere (inputs are never zero).
* In-place update: the kernel's own `input_output_aliases` in the TPU-compiled HLO and in the
  CUDA-exported MLIR, and no copy of the state when the caller donates it.
* Lowering: Mosaic for a TPU v5p chip (libtpu AOT, `tpu_aot`) and Triton for CUDA (jax.export).
* Real accelerators: classes that run the compiled kernels, skipped without the hardware.
"""

from __future__ import annotations

import os
import re

# Other processes (parallel test workers, other checkouts) may hold libtpu's lock for AOT compiles.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from pallas_kernels.mamba2 import kernel_decode as kd  # noqa: E402
from pallas_kernels.mamba2 import reference  # noqa: E402

F32 = jnp.float32
KERNELS = {"tpu": kd.state_update_tpu, "gpu": kd.state_update_gpu}
# (b, h, p, g, n): small (r = 2 heads per group), and TurboS's Mamba2 heads (r = 4).
SMALL = (2, 4, 8, 2, 16)
TURBOS = (2, 64, 64, 16, 128)
TURBOS_DECODE = (8, 64, 64, 16, 128)
ODD = (3, 12, 16, 3, 32)  # nothing a power of 2 or a multiple of 8 except p, n
BIG = (2, 128, 64, 16, 256)  # 4 MiB state blocks: needs the raised scoped-VMEM limit
# Inputs in either dtype are exactly representable in fp32 and the reference computes in fp32, so
# the only difference is fp32 summation order over n: relative to the output's scale.
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-6}


def _nonzero(key, shape, dtype, lo=0.5, hi=1.5):
    """Random values with |v| in [lo, hi) and random sign: never zero."""
    k1, k2 = jax.random.split(key)
    sign = jnp.where(jax.random.bernoulli(k1, 0.5, shape), 1.0, -1.0)
    return (sign * jax.random.uniform(k2, shape, F32, lo, hi)).astype(dtype)


def make_inputs(shape, dtype, seed=0):
    b, h, p, g, n = shape
    ks = jax.random.split(jax.random.key(seed), 6)
    state = _nonzero(ks[0], (b, h, p, n), F32)
    x = _nonzero(ks[1], (b, h, p), dtype)
    dt = jax.random.uniform(ks[2], (b, h), F32, 0.05, 1.0)  # processed dt: > 0
    A = -jax.random.uniform(ks[3], (h,), F32, 0.5, 4.0)  # < 0: decay in (0, 1)
    B = _nonzero(ks[4], (b, g, n), dtype)
    C = _nonzero(ks[5], (b, g, n), dtype)
    return state, x, dt, A, B, C


def ref_step(state, x, dt, A, B, C):
    """The contract: reference.state_update without D/z/dt processing, everything in fp32."""
    f = lambda t: t.astype(F32)
    return reference.state_update(f(state), f(x), f(dt), f(A), f(B), f(C))


def assert_close(got, want, tol, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.float32, (what, got.shape, got.dtype)
    assert np.isfinite(got).all(), f"{what}: non-finite (unwritten) elements"
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("shape", [SMALL, TURBOS], ids=["small", "turbos"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_interpret_matches_reference(variant, dtype, shape):
    args = make_inputs(shape, dtype)
    y_ref, s_ref = ref_step(*args)
    y, s = jax.jit(lambda *a: KERNELS[variant](*a, interpret=True))(*args)
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(s, s_ref, TOL[dtype], "new state")
    # The new state differs from the old one everywhere, so an unwritten state element would fail.
    assert (np.asarray(s) != np.asarray(args[0])).all()


def test_tpu_interpreter_matches_reference():
    """The TPU interpreter (SMEM/VMEM, DMAs and grid simulated; uninitialised memory = NaN)."""
    from jax.experimental.pallas import tpu as pltpu

    args = make_inputs(SMALL, jnp.bfloat16)
    y_ref, s_ref = ref_step(*args)
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    y, s = jax.jit(lambda *a: kd.state_update_tpu(*a, interpret=params))(*args)
    assert_close(y, y_ref, TOL[jnp.bfloat16], "y")
    assert_close(s, s_ref, TOL[jnp.bfloat16], "new state")


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_recurrence_of_several_steps(variant):
    """Four decode steps, the state donated and fed back each time, vs the reference recurrence."""
    shape, steps = SMALL, 4
    state, _, _, A, _, _ = make_inputs(shape, jnp.bfloat16)
    step = jax.jit(lambda *a: KERNELS[variant](*a, interpret=True), donate_argnums=0)
    s_ref, s = state, jnp.array(state)
    for t in range(steps):
        _, x, dt, _, B, C = make_inputs(shape, jnp.bfloat16, seed=t + 1)
        y_ref, s_ref = ref_step(s_ref, x, dt, A, B, C)
        y, s = step(s, x, dt, A, B, C)
        assert_close(y, y_ref, 1e-5, f"y at step {t}")
    assert_close(s, s_ref, 1e-5, "state after the last step")


def test_interpret_mode_poisons_outputs():
    """The premise of the checks above: an output element a kernel never writes reads NaN."""

    def half_kernel(o_ref):
        o_ref[:4] = jnp.zeros((4, 128), F32)

    out = pl.pallas_call(half_kernel, out_shape=jax.ShapeDtypeStruct((8, 128), F32), interpret=True)()
    assert np.isnan(np.asarray(out)[4:]).all() and (np.asarray(out)[:4] == 0).all()


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_donated_step_aliases_state_on_cpu(variant):
    """Lowered for the host: the donated state is marked as aliasing the new-state output."""
    args = make_inputs(SMALL, jnp.float32)
    step = jax.jit(lambda *a: KERNELS[variant](*a, interpret=True), donate_argnums=0)
    mlir = step.lower(*args).as_text()
    assert re.search(r"%arg0: tensor<2x4x8x16xf32> \{[^}]*tf\.aliasing_output = 1", mlir), mlir[:2000]


def test_bad_arguments_raise():
    args = make_inputs(SMALL, jnp.float32)
    state, x, dt, A, B, C = args
    with pytest.raises(ValueError, match="bad shapes"):
        kd.state_update_tpu(state, x[:, :, :4], dt, A, B, C, interpret=True)
    with pytest.raises(ValueError, match="float32"):
        kd.state_update_gpu(state.astype(jnp.bfloat16), x, dt, A, B, C, interpret=True)
    with pytest.raises(ValueError, match="heads=3"):
        kd.state_update_tpu(*args, block=kd.BlockSizes(heads=3), interpret=True)
    with pytest.raises(ValueError, match="block_p=3"):
        kd.state_update_gpu(*args, block=kd.BlockSizes(block_p=3), interpret=True)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_not_differentiable(variant):
    """Decode is inference only; a gradient through the kernel fails loudly rather than silently."""
    state, *rest = make_inputs(SMALL, jnp.float32)
    with pytest.raises(NotImplementedError):
        jax.grad(lambda s: KERNELS[variant](s, *rest, interpret=True)[0].sum())(state)


def test_shapes_without_a_kernel_fall_back_to_xla():
    """Non-power-of-2 p/n (Triton) and dt beyond the SMEM budget (Mosaic) take the plain-JAX step
    rather than raising: `by_platform` traces every platform's branch."""
    odd = make_inputs((2, 4, 12, 2, 20), jnp.bfloat16)
    assert "pallas_call" not in str(jax.make_jaxpr(kd.state_update_gpu)(*odd))
    y_ref, s_ref = ref_step(*odd)
    y, s = kd.state_update_gpu(*odd)
    assert_close(y, y_ref, 1e-6, "y")
    assert_close(s, s_ref, 1e-6, "new state")
    wide = _abstract((1025, 64, 8, 16, 16), jnp.bfloat16)
    assert "pallas_call" not in str(jax.make_jaxpr(kd.state_update_tpu)(*wide))
    assert "pallas_call" in str(jax.make_jaxpr(kd.state_update_tpu)(*_abstract(TURBOS, jnp.bfloat16)))


def test_default_blocks():
    # TurboS: 32 heads (8 groups) of 64 x 128 fp32 = 1 MiB of state per TPU step.
    assert kd._tpu_heads(None, 64, 4, 64, 128) == 32
    assert kd._tpu_heads(None, 4, 2, 8, 16) == 4  # tiny: the whole head axis
    assert kd._gpu_block_p(None, 8, 64, 64) == 64
    assert kd._gpu_block_p(None, 1, 64, 64) == 16  # batch 1: split p to fill the SMs


# ----------------------------------------------------------------------------- lowering (no devices)
def _abstract(shape, x_dtype):
    b, h, p, g, n = shape
    S = jax.ShapeDtypeStruct
    return [
        S((b, h, p, n), F32),
        S((b, h, p), x_dtype),
        S((b, h), F32),
        S((h,), F32),
        S((b, g, n), x_dtype),
        S((b, g, n), x_dtype),
    ]


@pytest.mark.parametrize(
    "shape,dtype",
    [(TURBOS_DECODE, jnp.float32), (TURBOS_DECODE, jnp.bfloat16), (ODD, jnp.bfloat16), (BIG, jnp.bfloat16)],
    ids=["turbos-f32", "turbos-bf16", "odd-bf16", "big-bf16"],
)
def test_tpu_lowering_mosaic(shape, dtype):
    from tpu_aot import compile_for_tpu, count_mosaic_calls

    hlo = compile_for_tpu(kd.state_update_tpu, *_abstract(shape, dtype))
    assert count_mosaic_calls(hlo) >= 1


def test_tpu_donated_state_updated_in_place():
    """Compiled for TPU with the state donated: the Mosaic call aliases operand 5 (state) to output
    1, the module aliases parameter 0 to output 1, and the state is never copied."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from tpu_aot import MOSAIC_TARGET, tpu_devices

    mesh = Mesh(tpu_devices()[:1], ("x",))
    rep = NamedSharding(mesh, P())
    args = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in _abstract(TURBOS_DECODE, jnp.bfloat16)
    ]
    fn = jax.shard_map(kd.state_update_tpu, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    hlo = jax.jit(fn, donate_argnums=0).lower(*args).compile().as_text()
    call = next(line for line in hlo.splitlines() if MOSAIC_TARGET in line)
    assert "output_to_operand_aliasing={{1}: (5, {})}" in call, call[:3000]
    assert re.search(r"input_output_alias=\{ \{1\}: \(0, \{\}", hlo), hlo[:2000]
    assert not re.search(r"f32\[8,64,64,128\][^=]*= *copy", hlo) and " copy(" not in hlo, hlo


@pytest.mark.parametrize("shape", [TURBOS_DECODE, ODD], ids=["turbos", "odd"])
def test_gpu_lowering_triton(shape):
    args = _abstract(shape, jnp.bfloat16)
    b, h, p, _, n = shape
    exported = jax.export.export(
        jax.jit(kd.state_update_gpu, donate_argnums=0),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
    mlir = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in mlir
    # The kernel's own alias (new state = operand 5) and the donation of the jitted argument.
    assert re.search(r"output_operand_alias<output_tuple_indices = \[1\],\s*operand_index = 5", mlir)
    assert re.search(rf"%arg0: tensor<{b}x{h}x{p}x{n}xf32> \{{[^}}]*tf\.aliasing_output = 1", mlir)


# ------------------------------------------------------------------------------- real accelerators
def _platform():
    return jax.devices()[0].platform


class _OnDevice:
    """Compiled kernel vs reference on the device, and the donated state buffer consumed."""

    kernel = None

    def test_matches_reference(self):
        args = make_inputs(TURBOS_DECODE, jnp.bfloat16)
        y_ref, s_ref = jax.jit(ref_step)(*args)
        y, s = jax.jit(type(self).kernel)(*args)
        assert_close(y, y_ref, 1e-5, "y")
        assert_close(s, s_ref, 1e-5, "new state")

    def test_donated_state_consumed(self):
        args = make_inputs(TURBOS_DECODE, jnp.bfloat16)
        state = jnp.array(args[0])
        _, s = jax.jit(type(self).kernel, donate_argnums=0)(state, *args[1:])
        s.block_until_ready()
        assert state.is_deleted()


@pytest.mark.skipif(_platform() != "gpu", reason="needs an NVIDIA GPU (run with JAX_PLATFORMS=cuda)")
class TestOnGpu(_OnDevice):
    kernel = staticmethod(kd.state_update_gpu)


@pytest.mark.skipif(_platform() != "tpu", reason="needs a TPU (run with JAX_PLATFORMS=tpu)")
class TestOnTpu(_OnDevice):
    kernel = staticmethod(kd.state_update_tpu)
