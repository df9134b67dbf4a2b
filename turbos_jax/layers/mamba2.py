"""The Mamba2 mixer, following mamba_ssm's `Mamba2` module (names, initialisation, numerics).

Shapes: B batch, L length, D d_model, H heads, P head_dim, G SSM groups, N d_state, K conv width.

Algorithm:
  1. in_proj: x (B, L, D) -> z (B, L, H, P), x (B, L, H, P), B and C (B, L, G, N), dt (B, L, H).
  2. Depthwise causal conv (width K, with bias) + SiLU over x, B and C. Taps that reach into an
     earlier packed segment are dropped, so no information crosses a document boundary.
  3. SSD chunked scan (`pallas_kernels.mamba2.chunk_scan`): dt = softplus(dt + dt_bias) clamped to
     dt_limit, A = -exp(A_log); per head state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T,
     y_t = C_t state_t + D x_t; the state resets where the segment id changes; fp32 state.
     With context parallelism (mesh context > 1) steps 2-3 run per sequence shard with a conv halo
     and the shards' states passed on (`layers/context_parallel.py`).
  4. Gated RMSNorm per SSM group: norm(y * silu(z)).
  5. out_proj: (B, L, H, P) -> (B, L, D).

Parameter layout vs mamba_ssm. mamba_ssm fuses `in_proj.weight` (2*H*P + 2*G*N + H, D) in the order
z, x, B, C, dt, and `conv1d.weight` (H*P + 2*G*N, 1, K) over [x, B, C]. Here each part is its own
array, so tensor parallelism can shard heads and groups without cutting across parts:
  in_proj.{z, x}: (D, H, P); in_proj.{B, C}: (D, G, N); in_proj.dt: (D, H)   (= rows of W^T)
  conv1d.{x, B, C}: (K, H, P) / (K, G, N), conv1d.{x_bias, B_bias, C_bias}: (H, P) / (G, N)
  dt_bias, A_log, D: (H,); norm.scale: (H, P) (= norm.weight reshaped); out_proj: (H, P, D).
Converting a mamba_ssm checkpoint is a split of the fused rows in that order and a transpose.

Tensor parallelism shards heads and groups over `model`. With a single group (Granite-4.0-H) the
group axis of B, C and their conv taps is replicated instead (every head shard needs that group),
and the gated norm's statistics over all heads become a cross-shard mean, which GSPMD inserts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import mamba2 as mamba2_ops
from pallas_kernels import resolve_impl
from pallas_kernels.mamba2.reference import process_dt
from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.layers import context_parallel
from turbos_jax.layers.norms import GatedGroupRMSNorm

# mamba_ssm's initialisation ranges (Mamba2 defaults).
DT_INIT_RANGE = (1e-3, 1e-1)
DT_INIT_FLOOR = 1e-4
A_INIT_RANGE = (1.0, 16.0)


def _dt_bias_init(key, shape, dtype):
    """dt log-uniform in DT_INIT_RANGE (floored), stored as its inverse softplus."""
    lo, hi = DT_INIT_RANGE
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(hi) - math.log(lo)) + math.log(lo)), DT_INIT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)).astype(dtype)


def _conv_init(width):
    """PyTorch's Conv1d default for a depthwise conv: U(-1/sqrt(K), 1/sqrt(K)), fan_in = K."""
    bound = 1.0 / math.sqrt(width)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def causal_depthwise_conv(
    u: jax.Array, kernel: jax.Array, bias: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """Causal depthwise conv within segments: u (B, L, *C), kernel (K, *C), bias (*C).

    out[t] = bias + sum_k kernel[k] * u[t - (K - 1) + k], counting only taps in the same segment as t.
    K is small (4), so K shifted multiply-adds beat a general convolution and keep the layout.
    """
    width, length = kernel.shape[0], u.shape[1]
    extra = (1,) * (u.ndim - 2)
    u_pad = jnp.pad(u, [(0, 0), (width - 1, 0)] + [(0, 0)] * (u.ndim - 2))
    seg_pad = jnp.pad(segment_ids, [(0, 0), (width - 1, 0)], constant_values=-1)
    out = jnp.broadcast_to(bias.astype(jnp.float32), u.shape)
    for k in range(width):
        tap = u_pad[:, k : k + length].astype(jnp.float32)
        same = (seg_pad[:, k : k + length] == segment_ids).reshape(*segment_ids.shape, *extra)
        out = out + jnp.where(same, tap, 0.0) * kernel[k].astype(jnp.float32)
    return out.astype(u.dtype)


def _group_axis(cfg: ModelConfig) -> str | None:
    """Logical name of the SSM-group axis: sharded like KV heads, replicated for a single group."""
    return None if cfg.mamba_groups == 1 else "kv_heads"


class Mamba2(nnx.Module):
    """Mamba2 mixer: (B, L, D) -> (B, L, D). See the module docstring for layouts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, p = cfg.d_model, cfg.mamba_heads, cfg.mamba_head_dim
        g, n, k = cfg.mamba_groups, cfg.mamba_d_state, cfg.mamba_conv
        pd = cfg.param_dtype
        proj = nnx.initializers.truncated_normal(stddev=cfg.init_std)
        conv = _conv_init(k)
        par = lambda init, shape, names: sharding.param(init, rngs.params(), shape, names, pd)
        grp = _group_axis(cfg)
        self.in_proj = nnx.Dict(
            z=par(proj, (d, h, p), ("embed", "heads", None)),
            x=par(proj, (d, h, p), ("embed", "heads", None)),
            B=par(proj, (d, g, n), ("embed", grp, None)),
            C=par(proj, (d, g, n), ("embed", grp, None)),
            dt=par(proj, (d, h), ("embed", "heads")),
        )
        self.conv1d = nnx.Dict(
            x=par(conv, (k, h, p), (None, "heads", None)),
            B=par(conv, (k, g, n), (None, grp, None)),
            C=par(conv, (k, g, n), (None, grp, None)),
            x_bias=par(conv, (h, p), ("heads", None)),
            B_bias=par(conv, (g, n), (grp, None)),
            C_bias=par(conv, (g, n), (grp, None)),
        )
        self.dt_bias = par(_dt_bias_init, (h,), ("heads",))
        self.A_log = par(_a_log_init, (h,), ("heads",))
        self.D = par(nnx.initializers.ones, (h,), ("heads",))
        self.norm = GatedGroupRMSNorm(h, p, g, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
        self.out_proj = par(proj, (h, p, d), ("heads", None, "embed"))

    def project(self, x: jax.Array):
        """Step 1: z, x (B, L, H, P); B, C (B, L, G, N); dt (B, L, H), all in cfg.dtype."""
        dt = self.cfg.dtype
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.astype(dt).reshape(-1, d)  # (B*L, D)

        # Plain 2-D matmuls rather than "bld,dhp->blhp" einsums: same math (merging contiguous
        # axes is a free reshape), but XLA:CPU compiles the einsum form and its gradient with
        # extra layout copies (measured on the tiny config: Mamba2 layer forward + backward
        # -16 %, training step -3 %; not measured on TPU/GPU).
        def proj(name):
            w = self.in_proj[name][...].astype(dt)
            return (x2 @ w.reshape(d, -1)).reshape(*lead, *w.shape[1:])

        z, xs, b, c, dts = (proj(name) for name in ("z", "x", "B", "C", "dt"))
        return z, sharding.constrain(xs, ("batch", "seq", "heads", None)), b, c, dts

    def convolve(self, xs, b, c, segment_ids):
        """Step 2: causal conv + SiLU of x, B, C within segments."""
        cv = self.conv1d
        act = lambda u, name: jax.nn.silu(
            causal_depthwise_conv(u, cv[name][...], cv[name + "_bias"][...], segment_ids)
        )
        return act(xs, "x"), act(b, "B"), act(c, "C")

    def ssm_params(self):
        """A (H,) fp32, D (H,), dt_bias (H,)."""
        return -jnp.exp(self.A_log[...].astype(jnp.float32)), self.D[...], self.dt_bias[...]

    def output(self, y, z):
        """Steps 4-5: gated group norm, then out_proj -> (B, L, D)."""
        dt = self.cfg.dtype
        out = jnp.einsum("blhp,hpd->bld", self.norm(y, z).astype(dt), self.out_proj[...].astype(dt))
        return sharding.constrain(out, ("batch", "seq", None))

    def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x (B, L, D), segment_ids (B, L) int32 -> (B, L, D)."""
        cfg = self.cfg
        z, xs, b, c, dts = self.project(x)
        a, d_skip, dt_bias = self.ssm_params()
        impl = resolve_impl(cfg.kernel_impl)
        if context_parallel.context_size() > 1:  # conv halo + state passing over `context`
            cv = self.conv1d
            conv_params = [cv[k][...] for k in ("x", "B", "C", "x_bias", "B_bias", "C_bias")]
            y = context_parallel.mamba2_scan(
                cfg, impl, causal_depthwise_conv, xs, b, c, dts, segment_ids, conv_params, a, d_skip, dt_bias
            )
            return self.output(y, z)
        xs, b, c = self.convolve(xs, b, c, segment_ids)

        def scan(xs, dts, a, b, c, d_skip, dt_bias, segment_ids):
            return mamba2_ops.chunk_scan(
                xs,
                dts,
                a,
                b,
                c,
                cfg.mamba_chunk,
                D=d_skip,
                dt_bias=dt_bias,
                seq_idx=segment_ids,
                dt_softplus=True,
                dt_limit=cfg.mamba_dt_limit,
                impl=impl,
            )

        if impl == "pallas":  # GSPMD cannot split a kernel: each device scans its rows and heads
            act, per_head = ("batch", "seq", "heads", None), ("heads",)
            grp = ("batch", "seq", _group_axis(cfg), None)
            scan = sharding.manual_over_mesh(
                scan,
                (act, ("batch", "seq", "heads"), per_head, grp, grp, per_head, per_head, ("batch", "seq")),
                act,
            )
        y = scan(xs, dts, a, b, c, d_skip, dt_bias, segment_ids)
        return self.output(y, z)

    # ------------------------------------------------------------------ generation (state cache)
    def prefill(self, x: jax.Array, lengths: jax.Array, cache: dict | None = None, start=0):
        """Positions start .. start + C - 1 of right-padded prompts with real lengths (B,), x (B, C, D)
        -> (y (B, C, D), cache after them). `cache` holds the state after positions < start (None:
        empty, for a whole prompt with start = 0); chunked prefill calls this once per chunk.

        Padding must not advance the recurrence: dt is processed here (bias, softplus, clamp) and
        set to exactly 0 on padding, so those steps neither decay (exp(0 * A) = 1) nor add input
        (dt * x * B = 0) and the scan's final state is the state after each row's last real token.
        The conv reads the K-1 inputs before `start` from the cache (zeros before position 0).
        cache = {"conv_x", "conv_B", "conv_C": the last K-1 real pre-conv inputs (B, K-1, ...) in
        cfg.dtype, zeros before the start; "ssm": (B, H, P, N) in cfg.ssm_state_dtype}.
        """
        cfg = self.cfg
        b, l, _ = x.shape
        valid = start + jnp.arange(l, dtype=jnp.int32)[None, :] < lengths[:, None]
        z, xs, bm, cm, dts = self.project(x)
        width = cfg.mamba_conv

        def with_taps(u, name):  # [K-1 inputs before start, u]: (B, K-1 + C, ...)
            prev = jnp.zeros_like(u[:, : width - 1]) if cache is None else cache["conv_" + name]
            return jnp.concatenate([prev.astype(u.dtype), u], axis=1)

        xs, bm, cm = with_taps(xs, "x"), with_taps(bm, "B"), with_taps(cm, "C")
        n_new = jnp.clip(lengths - start, 0, l)  # real tokens in this chunk

        def last_inputs(u):  # u[n : n + K-1] = the K-1 inputs before position start + n
            return jax.vmap(lambda r, n: jax.lax.dynamic_slice_in_dim(r, n, width - 1, 0))(u, n_new)

        new = {"conv_x": last_inputs(xs), "conv_B": last_inputs(bm), "conv_C": last_inputs(cm)}
        seg = jnp.concatenate([jnp.ones((b, width - 1), jnp.int32), valid.astype(jnp.int32)], axis=1)
        xs, bm, cm = (u[:, width - 1 :] for u in self.convolve(xs, bm, cm, seg))
        a, d_skip, dt_bias = self.ssm_params()
        dtp = process_dt(dts, dt_bias, True, cfg.mamba_dt_limit)
        dtp = jnp.where(valid[..., None], dtp, 0.0)
        y, final = mamba2_ops.chunk_scan(
            xs,
            dtp,
            a,
            bm,
            cm,
            cfg.mamba_chunk,
            D=d_skip,
            initial_states=None if cache is None else cache["ssm"],
            return_final_states=True,
            impl=resolve_impl(cfg.kernel_impl),
        )
        new["ssm"] = final.astype(cfg.ssm_state_dtype)
        return self.output(y, z), new

    def decode(self, x: jax.Array, cache: dict):
        """One token per sequence: x (B, 1, D) -> (y (B, 1, D), cache advanced by one step)."""
        cfg = self.cfg
        z, xs, bm, cm, dts = self.project(x)
        cv, new = self.conv1d, {}

        def conv_step(u, name):  # the forward's tap order: bias + sum_k kernel[k] * u[t-K+1+k]
            window = jnp.concatenate([cache["conv_" + name], u], axis=1)  # (B, K, ...)
            kernel = cv[name][...].astype(jnp.float32)
            out = jnp.broadcast_to(cv[name + "_bias"][...].astype(jnp.float32), u[:, 0].shape)
            for k in range(window.shape[1]):
                out = out + window[:, k].astype(jnp.float32) * kernel[k]
            new["conv_" + name] = window[:, 1:]
            return jax.nn.silu(out.astype(u.dtype))

        xs1, b1, c1 = conv_step(xs, "x"), conv_step(bm, "B"), conv_step(cm, "C")
        a, d_skip, dt_bias = self.ssm_params()
        y, new["ssm"] = mamba2_ops.state_update(
            cache["ssm"],
            xs1,
            dts[:, 0],
            a,
            b1,
            c1,
            D=d_skip,
            dt_bias=dt_bias,
            dt_softplus=True,
            dt_limit=cfg.mamba_dt_limit,
            impl=resolve_impl(cfg.kernel_impl),
        )
        return self.output(y[:, None], z), new
