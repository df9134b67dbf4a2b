"""Context parallelism (CP): each device of the `context` mesh axis holds one contiguous shard of
every sequence (shard r = positions [r * L/P, (r + 1) * L/P), P = mesh context size).

Token-wise layers (projections, norms, the MoE router) need nothing; the expert-parallel MoE dispatch
keeps the sequence sharded (layers/moe.py). Attention gathers K/V over `context` and keeps its
queries local (`attention_shard`). The Mamba2 mixer keeps its recurrence exact with TurboS's state
passing (report §5), in `mamba2_shard`, inside `jax.shard_map`:

  1. Conv halo: the last K-1 pre-conv rows of x, B, C (and their segment ids) of shard r-1 come by
     `ppermute`; the conv runs over [halo, shard] and the first K-1 outputs are dropped. Rank 0 gets
     segment id -1 for its halo, so the conv's same-segment test drops those taps.
  2. The unchanged chunked scan (`chunk_scan`, XLA or Pallas) of the shard from a zero state, with
     its final state S_r (b, h, p, n) fp32.
  3. Shard summary: total decay a_r = exp(sum_t dt_t A) (0 if a document starts inside the shard:
     the incoming state then reaches nothing past it) and the continuation gate
     g_r = [first id of shard r == last id of shard r-1] (g_0 = 0).
  4. Incoming state I_r = g_r H_{r-1}, H_r = S_r + a_r I_r, H_{-1} = 0, by one of two schemes
     (cfg.mamba_cp_scheme): "parallel" all-gathers every (S_j, a_j g_j) and combines the shards
     before r locally (`incoming_state_parallel`); "sequential" passes H rank to rank with P - 1
     `ppermute`s (`incoming_state_sequential`). Both are exact; autodiff gives the backward
     (all-gather -> reduce-scatter, ppermute -> reverse ppermute).
  5. By linearity of the scan in its initial state, the outputs of the shard's first document get
     y_t += C_t . (exp(cs_t) I_r), cs_t = sum of dt A from the shard start to t
     (`first_segment_correction`); later documents started from zero anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import mamba2 as mamba2_ops
from pallas_kernels.attention import reference as attention_reference
from pallas_kernels.mamba2.reference import process_dt, segment_ids
from turbos_jax import sharding

AXIS = "context"
F32 = jnp.float32


def context_size() -> int:
    """Size of the `context` axis of the mesh in context (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    return mesh.shape.get(AXIS, 1)


def _to_next(x, cp: int):
    """Shard r receives shard r-1's x; shard 0 receives zeros."""
    return jax.lax.ppermute(x, AXIS, perm=[(i, i + 1) for i in range(cp - 1)])


def previous_rows(u, n: int, cp: int):
    """The last n rows (axis 1) of the previous shard's u: (b, n, ...); zeros on shard 0."""
    return _to_next(u[:, -n:], cp)


# ------------------------------------------------------------------------------------------ Mamba2
def incoming_state_parallel(final, carry, cp: int):
    """final (b, h, p, n) = S_r, carry (b, h) = a_r g_r -> H_{r-1} (b, h, p, n).

    One all-gather of every shard's summary; then H_{r-1} = sum_{j<r} (prod_{j<k<r} a_k g_k) S_j,
    the products taken directly (no logs: a_k may be exactly 0)."""
    r = jax.lax.axis_index(AXIS)
    states = jax.lax.all_gather(final, AXIS)  # (P, b, h, p, n)
    carries = jax.lax.all_gather(carry, AXIS)  # (P, b, h)
    j = jnp.arange(cp)
    between = (j[:, None] < j[None, :]) & (j[None, :] < r)  # [j, k]: j < k < r
    factors = jnp.where(between[:, :, None, None], carries[None], 1.0)  # (P_j, P_k, b, h)
    weights = jnp.prod(factors, axis=1) * (j < r)[:, None, None]  # (P_j, b, h)
    return jnp.einsum("jbh,jbhpn->bhpn", weights, states, precision=jax.lax.Precision.HIGHEST)


def incoming_state_sequential(final, carry, cp: int):
    """As `incoming_state_parallel`, by P - 1 rounds of H_r = S_r + a_r g_r H_{r-1}, each shard
    sending its H to the next: after round t shards 0..t hold their exact H."""
    h = final
    prev = jnp.zeros_like(final)
    for _ in range(cp - 1):
        prev = _to_next(h, cp)
        h = final + carry[..., None, None] * prev
    return prev


def first_segment_correction(c, incoming, cs, first):
    """C (b, l, g, n), incoming state I_r (b, h, p, n) fp32, cs (b, l, h) fp32, first (b, l) bool ->
    (b, l, h, p) fp32: C_t . (exp(cs_t) I_r) on the shard's first document, 0 elsewhere."""
    b, l, g, n = c.shape
    h, p = incoming.shape[1:3]
    per_group = incoming.reshape(b, g, h // g, p, n)
    out = jnp.einsum(
        "blgn,bgrpn->blgrp", c.astype(F32), per_group, precision=jax.lax.Precision.HIGHEST
    ).reshape(b, l, h, p)
    decay = jnp.where(first[..., None], jnp.exp(cs), 0.0)  # cs <= 0 on the kept entries
    return out * decay[..., None]


INCOMING_STATE = {"parallel": incoming_state_parallel, "sequential": incoming_state_sequential}


def mamba2_shard(cfg, impl, conv, xs, b, c, dts, seg, wx, wb, wc, bx, bb, bc, a, d_skip, dt_bias):
    """Steps 1-5 of the module docstring on one shard (inside shard_map).

    xs (b, l, h, p), b/c (b, l, g, n): pre-conv in_proj outputs; dts (b, l, h) raw dt; seg (b, l);
    w*/b* conv kernels and biases; a, d_skip, dt_bias (h,); conv(u, kernel, bias, seg) the causal
    conv. Returns y (b, l, h, p) in xs.dtype, as `chunk_scan` would over the whole sequence.
    """
    cp = jax.sharding.get_abstract_mesh().shape[AXIS]
    r = jax.lax.axis_index(AXIS)
    width = max(cfg.mamba_conv - 1, 1)

    # 1. Conv halo.
    seg_prev = jnp.where(r == 0, -1, previous_rows(seg, width, cp))  # (b, width)
    seg_ext = jnp.concatenate([seg_prev, seg], axis=1)

    def conv_act(u, kernel, bias):
        u_ext = jnp.concatenate([previous_rows(u, width, cp), u], axis=1)
        return jax.nn.silu(conv(u_ext, kernel, bias, seg_ext)[:, width:])

    xs, b, c = conv_act(xs, wx, bx), conv_act(b, wb, bb), conv_act(c, wc, bc)

    # 2. The shard's own scan from a zero state.
    y0, final = mamba2_ops.chunk_scan(
        xs,
        dts,
        a,
        b,
        c,
        cfg.mamba_chunk,
        D=d_skip,
        dt_bias=dt_bias,
        seq_idx=seg,
        dt_softplus=True,
        dt_limit=cfg.mamba_dt_limit,
        return_final_states=True,
        impl=impl,
    )

    # 3. Summary: decay over the shard (cumulative from its start) and the continuation gate.
    cs = jnp.cumsum(process_dt(dts, dt_bias, True, cfg.mamba_dt_limit) * a.astype(F32), axis=1)  # (b, l, h)
    local = segment_ids(seg)  # 0 on the shard's first document
    decay = jnp.exp(cs[:, -1]) * (local[:, -1] == 0)[:, None]  # (b, h)
    gate = ((seg[:, 0] == seg_prev[:, -1]) & (r > 0)).astype(F32)  # (b,)

    # 4. The state entering the shard, 5. its contribution to the first document.
    prev = INCOMING_STATE[cfg.mamba_cp_scheme](final, decay * gate[:, None], cp)
    incoming = gate[:, None, None, None] * prev
    y = y0.astype(F32) + first_segment_correction(c, incoming, cs, local == 0)
    return y.astype(y0.dtype)


def mamba2_scan(cfg, impl, conv, xs, b, c, dts, seg, conv_params, a, d_skip, dt_bias):
    """`mamba2_shard` under shard_map over the mesh in context (context > 1): the Mamba2 conv and
    scan over sequence-sharded inputs (see `mamba2_shard` for shapes); conv_params = (x, B, C
    kernels, x, B, C biases)."""
    length = xs.shape[1]
    cp = context_size()
    if length % cp or length // cp < cfg.mamba_conv - 1:
        raise ValueError(
            f"sequence length {length} must split into {cp} context shards of >= mamba_conv - 1 tokens"
        )
    act, grp, per_head = ("batch", "seq", "heads", None), ("batch", "seq", "kv_heads", None), ("heads",)
    names = (act, grp, grp, ("batch", "seq", "heads"), ("batch", "seq"))
    names += ((None, "heads", None), (None, "kv_heads", None), (None, "kv_heads", None))
    names += (("heads", None), ("kv_heads", None), ("kv_heads", None), per_head, per_head, per_head)
    fn = functools.partial(mamba2_shard, cfg, impl, conv)
    return sharding.manual_over_mesh(fn, names, act)(xs, b, c, dts, seg, *conv_params, a, d_skip, dt_bias)


# --------------------------------------------------------------------------------------- attention
def attention_shard(q, k, v, q_seg, kv_seg):
    """Local queries q (b, l, H, Dh) and q_seg (b, l) against the gathered k, v (b, L, K, Dh) and
    kv_seg (b, L): the blockwise attention with query indices offset by r * l."""
    offset = jax.lax.axis_index(AXIS) * q.shape[1]
    return attention_reference.attention_local_queries(q, k, v, q_seg, kv_seg, offset)


def attention(q, k, v, segment_ids):
    """Causal packed-segment attention over sequence-sharded q (B, L, H, Dh), k/v (B, L, K, Dh),
    segment_ids (B, L): K/V and their segment ids enter shard_map gathered over `context` (GSPMD
    all-gathers them; autodiff reduce-scatters dK/dV), queries stay local."""
    q_names, kv_names = ("batch", "seq", "heads", None), ("batch", None, "kv_heads", None)
    names = (q_names, kv_names, kv_names, ("batch", "seq"), ("batch", None))
    return sharding.manual_over_mesh(attention_shard, names, q_names)(q, k, v, segment_ids, segment_ids)
