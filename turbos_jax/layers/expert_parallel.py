"""Dropless expert parallelism: tokens travel to the shard holding their expert by ragged all-to-all.

Runs inside `jax.shard_map` with the `expert` mesh axis manual (see `MoEFFN._dropless_expert_parallel`).
Per device, with ep expert shards, El = E / ep local experts, Tl local tokens, k choices, d model width:

  1. Sort the local (token, choice) slots by global expert id (`moe.sort_by_expert`) and gather their
     rows (`moe.permute`): (Tl*k, d). Shard j's experts are ids [j*El, (j+1)*El), so the rows for
     shard j are one contiguous block; "no expert" slots (id E) sort last and are sent nowhere.
  2. counts[i, j, e] = rows device i sends to local expert e of shard j: every device's per-expert
     group sizes, all-gathered over `expert` (an (ep, ep, El) int matrix, tiny). It gives the send
     and receive sizes and the offsets at which each sender's block lands in each receiver.
  3. `ragged_all_to_all` sends each block to its shard -> (ep*Tl*k, d) receive buffer (sized for the
     worst case, every slot of the group landing here), rows grouped by sender, then by local expert.
  4. Regroup the received rows by local expert (a second sort, k=1), run the SwiGLU experts with the
     grouped matmul, psum over `model` (the F contraction is split over it), restore received order.
  5. The inverse `ragged_all_to_all` returns every row to the device and position it came from;
     `moe.unpermute` weights them by the gates and sums each token's choices.

Each routed row crosses the network once each way (an all-gather of tokens would send every token to
every shard). XLA:CPU has no ragged all-to-all, so on CPU it is emulated exactly with an all-gather
and a gather (`_emulated_ragged_all_to_all`), which is what the multi-device CPU tests run; TPU and
GPU programs get the real collective (`pallas_kernels.by_platform` picks at lowering time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import by_platform
from pallas_kernels import moe as moe_ops
from turbos_jax.layers.mlp import activate


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def _emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` semantics from an all-gather: output rows
    [output_offsets_i[me], + send_sizes_i[me]) = operand_i rows [input_offsets_i[me], ...) for every
    sender i; other output rows keep `output`'s values. recv_sizes is implied (kept for the
    signature)."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    everything = jax.lax.all_gather(operand, axis_name)  # [ep, rows, d]
    gather = lambda v: jax.lax.all_gather(v, axis_name)[:, me]  # sender i's entry for me: [ep]
    start, size, dest = gather(input_offsets), gather(send_sizes), gather(output_offsets)
    pos = jnp.arange(output.shape[0])
    inside = (pos[None] >= dest[:, None]) & (pos[None] < (dest + size)[:, None])  # [ep, out rows]
    sender = jnp.argmax(inside, axis=0)  # [out rows]
    row = jnp.clip(start[sender] + pos - dest[sender], 0, operand.shape[0] - 1)
    return jnp.where(jnp.any(inside, axis=0)[:, None], everything[sender, row], output)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` on TPU/GPU, its exact emulation elsewhere (XLA:CPU lacks it)."""
    real = functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name)
    emulated = functools.partial(_emulated_ragged_all_to_all, axis_name=axis_name)
    return by_platform(
        operand,
        output,
        input_offsets,
        send_sizes,
        output_offsets,
        recv_sizes,
        tpu=real,
        gpu=real,
        other=emulated,
    )


def dropless_experts(
    x, ids, gates, wg, wu, wo, *, num_experts: int, ep: int, impl: str, model_axis: str | None
):
    """Steps 1-5 of the module docstring for one device.

    x (T, d) local tokens; ids, gates (T, k); wg, wu (El, d, Fm) and wo (El, Fm, d) this shard's
    experts (Fm = F / model), already in the compute dtype; wg is None for relu2 experts. Returns
    (T, d) in x's dtype: the routed experts' output.
    """
    t, k = ids.shape
    el = num_experts // ep
    me = jax.lax.axis_index("expert")

    order, sizes = moe_ops.sort_by_expert(ids, num_experts)  # [T*K], [E]
    xs = moe_ops.permute(x, order, k, impl=impl)  # [T*K, d]  step 1
    counts = jax.lax.all_gather(sizes.reshape(ep, el), "expert")  # [ep src, ep dst, El]  step 2
    per_pair = jnp.sum(counts, axis=-1)  # [src, dst] rows
    send, recv = per_pair[me], per_pair[:, me]  # [ep] rows to each shard / from each device
    send_off = _exclusive_cumsum(send)  # where each destination's block starts in xs
    land_off = _exclusive_cumsum(per_pair, axis=0)[me]  # where my block lands in each receiver

    buf = ep * t * k
    received = ragged_all_to_all(
        xs, jnp.zeros((buf, x.shape[1]), xs.dtype), send_off, send, land_off, recv, axis_name="expert"
    )  # [buf, d]  step 3

    # Step 4. Received rows come as (sender, local expert) segments in that order.
    seg_end = jnp.cumsum(counts[:, me, :].reshape(-1))  # [ep*El]
    seg = jnp.searchsorted(seg_end, jnp.arange(buf), side="right")  # [buf]
    local = jnp.where(seg < ep * el, seg % el, el)[:, None]  # [buf, 1]; el = "no expert"
    order2, sizes2 = moe_ops.sort_by_expert(local, el)  # [buf], [El]
    xr = moe_ops.permute(received, order2, 1, impl=impl)  # [buf, d]
    hg = None if wg is None else moe_ops.grouped_matmul(xr, wg, sizes2, impl=impl)
    h = activate(hg, moe_ops.grouped_matmul(xr, wu, sizes2, impl=impl))  # [buf, Fm]
    yr = moe_ops.grouped_matmul(h, wo, sizes2, impl=impl)  # [buf, d]
    if model_axis is not None:
        yr = jax.lax.psum(yr, model_axis)
    y_recv = moe_ops.unpermute(yr, order2, jnp.ones((buf, 1), yr.dtype), impl=impl)  # [buf, d]

    # Step 5. Back to the senders: the mirror image of step 3.
    back_off = _exclusive_cumsum(recv)  # my received blocks, by sender
    home_off = _exclusive_cumsum(per_pair, axis=1)[:, me]  # where each sender had put my block
    ys = ragged_all_to_all(
        y_recv, jnp.zeros_like(xs), back_off, recv, home_off, send, axis_name="expert"
    )  # [T*K, d]
    return moe_ops.unpermute(ys, order, gates, impl=impl)  # [T, d]
