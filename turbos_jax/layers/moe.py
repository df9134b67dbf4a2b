"""Mixture-of-Experts feed-forward: one shared expert plus top-k of E routed experts.

TurboS: E = 32 routed experts, top-2, 1 shared expert, each of intermediate size F = 17,024.
`y = shared(x) + sum_j gate_j * expert_{e_j}(x)`, with `expert(x) = (silu(x Wg) * (x Wu)) Wo`
(cfg.expert_activation "swiglu"), or `relu(x Wu)^2 Wo` ("relu2": no Wg; Nemotron-3). The shared
expert has width cfg.shared_width and the same activation.

Routing, per token (router math in float32):
  1. logits = x @ W_router                       # [B, L, E]
  2. probs = softmax(logits), or sigmoid(logits) with cfg.router_score "sigmoid"   # [B, L, E]
  3. ids = top_k(probs + bias, k), top_p = probs at ids   # [B, L, K]. The bias (cfg.router_bias,
     a per-expert `router_bias` parameter the gradient never reaches) steers the choice only
     (aux-loss-free balancing, as DeepSeek-V3 and Nemotron-3's e_score_correction_bias).
  4. gates = top_p / sum_j top_p                 # [B, L, K], renormalised to sum to 1
     (cfg.renorm_topk), then x cfg.routed_scale.
     The report does not say whether the top-k probabilities are renormalised; we follow GShard's
     top-2 gating, which does, so the routed part of the output keeps unit total weight whatever
     the router's confidence (with k = 1 the gate is then always 1 and the router learns only from
     the auxiliary losses).
  5. Padding tokens (valid == False) are given the "no expert" id E: they take no expert capacity,
     no grouped-matmul rows with work in them, and count in no statistic. Their routed output is 0
     (the shared expert still runs on them, harmlessly).
  6. Expert compute in cfg.dtype, by one of two modes:

Capacity mode (cfg.capacity_factor > 0, TurboS training): tokens are routed in capacity groups of
N = cfg.capacity_group consecutive tokens (N = L, one group per sequence, when it is 0): G = B * L/N
groups of S = N tokens, and every expert has C = cfg.capacity(N) = ceil(capacity_factor * N * k / E)
slots per group. A group of N routes exactly as an N-token sequence would.
  a. Slots are claimed in token order, each token's choices first-to-last (`capacity_positions`).
     Token-major order keeps the model causal: whether token t keeps a choice depends only on
     tokens <= t. (GShard's order, all first choices before any second choice, lets a later
     token's first choice evict an earlier token's second choice.)
  b. A choice whose slot is >= C is dropped: it contributes nothing and its gate weight is NOT
     re-spread over the token's other choices. Under overflow the latest tokens lose their
     choices first. Documents packed into one group share its capacity.
  c. tokens -> expert-major (E, G, C, D) buffers (scatter), experts as einsums batched over the
     leading E on (E, G*C, D) rows (`_capacity_experts`), gate-weighted gather back to (G, S, D).
  d. Expert parallelism (cfg.expert_parallel == "auto" and the mesh in context has expert > 1):
     step c runs inside `jax.shard_map` with two all-to-alls over the `expert` axis; see
     `_capacity_expert_parallel` and docs/sharding.md. Per-group capacity makes the result
     independent of the mesh. Otherwise GSPMD partitions the einsums. With context parallelism,
     groups of N > 0 tokens must tile each context shard (checked), so each shard routes its own.

Dropless mode (cfg.capacity_factor == 0): the B*L tokens are flattened, their T*k choices sorted by
expert, rows permuted into expert order, three grouped matmuls (ragged_dot) and a gate-weighted
unpermute. Nothing is dropped; padding choices sort after every expert and cost no FLOPs on backends
whose ragged matmul skips rows beyond sum(group_sizes). On CPU with at most SLOTTED_MAX_CHOICES
(token, choice) rows (decode steps), the same dropless result comes from capacity buffers instead
(`_dropless_slotted`): slots sized from the busiest expert's load, so nothing is dropped, and one
einsum per matrix over the whole expert stack. With expert parallelism (same condition as in
capacity mode) each choice's row travels to the shard holding its expert by ragged all-to-all and back
(`_dropless_expert_parallel`, `expert_parallel.py`): exact, each row crosses the network once each
way.

Auxiliary statistics (fp32, unweighted; same keys in both modes so scanned layers can sum them),
over valid tokens only, with f_e = fraction of (token, choice) assignments routed to e before any
dropping (sum_e f_e = 1) and P_e = mean router probability of e:
  moe_lb_loss           E * sum_e f_e * P_e (Switch/GShard load balance; 1 when perfectly uniform)
  moe_z_loss            mean of logsumexp(logits)^2 (ST-MoE router z-loss)
  moe_dropped_fraction  fraction of assignments dropped by capacity (0 in dropless mode)
  moe_expert_load       (E,) f_e
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import moe as moe_ops
from turbos_jax.config import ModelConfig
from turbos_jax.layers import context_parallel, expert_parallel
from turbos_jax.layers.mlp import activate, swiglu  # noqa: F401 (swiglu re-exported)
from turbos_jax.sharding import constrain, param

# Dropless layers with at most this many (token, choice) rows run `_dropless_slotted` on CPU; it
# beats the sorted path at decode and loses at prefill sizes (benchmarks/RESULTS.md).
SLOTTED_MAX_CHOICES = 1024
AUX_KEYS = ("moe_lb_loss", "moe_z_loss", "moe_dropped_fraction", "moe_expert_load")


def _capacity_experts(xe, wg, wu, wo, constrain_hidden: bool = False):
    """Experts over capacity buffers: xe (E, G, C, D), wg/wu (E, D, F) (wg None for relu2),
    wo (E, F, D) -> (E, G, C, D).

    The (G, C) slots are merged into one row axis first, so every einsum is a plain batched matmul
    (E, G*C, .) with one contracting dim: with two free row dims XLA:CPU transposes the (E, G, C, F)
    hidden for the weight gradients (measured: MoE layer forward + backward -22 % on the tiny
    config). G is the major part of the merged axis, so a batch sharding of G carries over.
    """
    e, g, c, d = xe.shape
    x2 = xe.reshape(e, g * c, d)  # [E, G*C, D]
    hg = None if wg is None else jnp.einsum("emd,edf->emf", x2, wg)  # [E, G*C, F]
    hu = jnp.einsum("emd,edf->emf", x2, wu)  # [E, G*C, F]
    h = activate(hg, hu)
    if constrain_hidden:
        h = constrain(h, ("expert", "batch", "mlp"))
    return jnp.einsum("emf,efd->emd", h, wo).reshape(e, g, c, d)  # [E, G, C, D]


def slot_buckets(choices: int, num_experts: int) -> tuple[int, ...]:
    """Slot counts `MoEFFN._dropless_slotted` chooses from, smallest first: 1.5x the mean load per
    expert, then x1.5 each, multiples of 8, the last one >= `choices` (every choice in one expert)."""
    buckets, c = [], 1.5 * choices / num_experts
    while not buckets or buckets[-1] < choices:
        slots = min(8 * -(-math.ceil(c) // 8), 8 * -(-choices // 8))
        buckets += [slots] if slots not in buckets else []
        c *= 1.5
    return tuple(buckets)


class MoEFFN(nnx.Module):
    """Shared + routed experts: `__call__(x, valid=None) -> (y, aux)`, see the module doc."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_dim
        init = nnx.initializers.truncated_normal(stddev=cfg.init_std)
        pd = cfg.param_dtype
        gated = cfg.expert_activation == "swiglu"
        self.router = param(init, rngs.params(), (d, e), ("embed", None), pd)
        if cfg.router_bias:
            self.router_bias = param(nnx.initializers.zeros, rngs.params(), (e,), (None,), pd)
        if gated:
            self.wi_gate = param(init, rngs.params(), (e, d, f), ("expert", "embed", "mlp"), pd)
        self.wi_up = param(init, rngs.params(), (e, d, f), ("expert", "embed", "mlp"), pd)
        self.wo = param(init, rngs.params(), (e, f, d), ("expert", "mlp", "embed"), pd)
        if cfg.num_shared_experts > 0:
            fs = cfg.shared_width
            if gated:
                self.shared_gate = param(init, rngs.params(), (d, fs), ("embed", "mlp"), pd)
            self.shared_up = param(init, rngs.params(), (d, fs), ("embed", "mlp"), pd)
            self.shared_down = param(init, rngs.params(), (fs, d), ("mlp", "embed"), pd)

    # ------------------------------------------------------------------------------------- routing
    def route(self, x: jax.Array, valid: jax.Array):
        """Router in fp32 -> (ids [B, L, K] with E for padding, gates [B, L, K] fp32, aux)."""
        cfg = self.cfg
        e, k = cfg.num_experts, cfg.top_k
        logits = jnp.einsum(
            "bld,de->ble",
            x.astype(jnp.float32),
            self.router[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )  # [B, L, E]
        if cfg.router_score == "softmax":
            probs = jax.nn.softmax(logits, axis=-1)  # [B, L, E]
        else:
            probs = jax.nn.sigmoid(logits)  # [B, L, E]
        if cfg.router_bias:
            bias = jax.lax.stop_gradient(self.router_bias[...].astype(jnp.float32))
            _, ids = jax.lax.top_k(probs + bias, k)  # [B, L, K]
            top_p = jnp.take_along_axis(probs, ids, axis=-1)  # [B, L, K]
        else:
            top_p, ids = jax.lax.top_k(probs, k)  # [B, L, K]
        gates = top_p
        if cfg.renorm_topk:
            gates = top_p / jnp.sum(top_p, axis=-1, keepdims=True)  # [B, L, K]
        if cfg.routed_scale != 1.0:
            gates = gates * cfg.routed_scale
        if cfg.router_score == "sigmoid":  # P_e of the balance statistic: scores summing to 1
            probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
        gates = jnp.where(valid[..., None], gates, 0.0)
        ids = jnp.where(valid[..., None], ids, e).astype(jnp.int32)  # E = "no expert"

        vmask = valid.astype(jnp.float32)  # [B, L]
        n_valid = jnp.maximum(jnp.sum(vmask), 1.0)
        # One-hot of the out-of-range padding id is all-zero, so padding never counts in f_e.
        load = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32), axis=(0, 1, 2)) / (n_valid * k)
        mean_prob = jnp.einsum("ble,bl->e", probs, vmask) / n_valid  # [E]
        z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
        aux = {
            "moe_lb_loss": e * jnp.sum(load * mean_prob),
            "moe_z_loss": jnp.sum(jnp.square(z) * vmask) / n_valid,
            "moe_expert_load": load,
        }
        return ids, gates, aux, n_valid

    # ------------------------------------------------------------------------------------- experts
    def _weights(self):
        """(wi_gate or None for relu2, wi_up, wo) in the compute dtype."""
        dt = self.cfg.dtype
        wg = self.wi_gate[...].astype(dt) if self.cfg.expert_activation == "swiglu" else None
        return wg, self.wi_up[...].astype(dt), self.wo[...].astype(dt)

    def _shared(self, x: jax.Array) -> jax.Array:
        dt = self.cfg.dtype
        gate = x @ self.shared_gate[...].astype(dt) if self.cfg.expert_activation == "swiglu" else None
        h = activate(gate, x @ self.shared_up[...].astype(dt))
        h = constrain(h, ("batch", "seq", "mlp"))
        return h @ self.shared_down[...].astype(dt)

    def _group_size(self, length: int) -> int:
        """Tokens per capacity group: cfg.capacity_group, or the whole sequence when it is 0."""
        n = self.cfg.capacity_group or length
        cp = context_parallel.context_size()
        if length % n or (self.cfg.capacity_group and (length // cp) % n):
            raise ValueError(
                f"capacity_group {n} must divide the sequence length {length} and each of its "
                f"{cp} context shards"
            )
        return n

    def _capacity(self, x, ids, gates, valid, n_valid, impl):
        cfg = self.cfg
        b, l, d = x.shape
        e, k = cfg.num_experts, cfg.top_k
        n = self._group_size(l)
        c = cfg.capacity(n)
        grouped = lambda a: a.reshape(b * (l // n), n, *a.shape[2:])  # [B, L, ...] -> [G, N, ...]
        pos = moe_ops.capacity_positions(grouped(ids), e).reshape(b, l, k)  # slot in the token's group
        kept = (pos >= 0) & (pos < c)  # [B, L, K]
        n_dropped = jnp.sum((~kept & valid[..., None]).astype(jnp.float32))
        dropped = n_dropped / (n_valid * k)

        mesh = self._expert_parallel_mesh(b)
        if mesh is not None:
            return self._capacity_expert_parallel(mesh, x, ids, pos, gates, n, c, impl), dropped
        ids, pos, gates = grouped(ids), grouped(pos), grouped(gates)  # [G, N, K]
        xe = moe_ops.capacity_dispatch(grouped(x), ids, pos, c, e, impl=impl)  # [E, G, C, D]
        # G = (B, L/N): rows over the batch axes, a row's groups over `context` (when L/N > 1).
        names = ("expert", "batch", "seq" if n < l else None, None, None)
        xe = constrain(xe.reshape(e, b, l // n, c, d), names).reshape(e, -1, c, d)
        # The hidden's merged (G*C) rows can name only the batch axes: constrain it per sequence.
        ye = _capacity_experts(xe, *self._weights(), constrain_hidden=n == l)  # [E, G, C, D]
        ye = constrain(ye.reshape(e, b, l // n, c, d), names).reshape(e, -1, c, d)
        y = moe_ops.capacity_combine(ye, ids, pos, gates, c, impl=impl)  # [G, N, D]
        return y.reshape(b, l, d), dropped

    def _expert_parallel_mesh(self, batch: int, kernels: bool = False):
        """The context mesh when the all-to-all path applies, else None (GSPMD path).

        Applies when cfg.expert_parallel == "auto", the mesh has an `expert` axis of size > 1 that
        divides num_experts, the batch divides over (data, expert) and expert_dim over `model`.
        With Pallas kernels (`kernels`), which GSPMD cannot partition, it applies on any mesh.
        """
        cfg = self.cfg
        if cfg.expert_parallel == "none" and not kernels:
            return None
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty or (mesh.shape.get("expert", 1) == 1 and not kernels):
            return None
        shape = mesh.shape
        n_batch = math.prod(shape[a] for a in ("data", "expert") if a in shape)
        if cfg.num_experts % shape["expert"] or batch % n_batch or cfg.expert_dim % shape.get("model", 1):
            return None
        return mesh

    def _capacity_expert_parallel(self, mesh, x, ids, pos, gates, n, c, impl):
        """Capacity-mode experts with the mesh axes manual: x (B, L, D), ids/pos/gates (B, L, K),
        n tokens per group, C slots per expert and group -> y (B, L, D).

        Per device (ep = mesh expert size, El = E / ep, Gl = local groups, Fm = F / model):
          1. dispatch its Gl groups locally into expert-major (E, Gl, C, D) buffers;
          2. all-to-all over `expert`: split E into ep blocks of El experts, send block j to expert
             shard j, concatenate what arrives along G -> (El, ep * Gl, C, D): every slot of this
             shard's experts, from every group of the ep devices in its expert group;
          3. the SwiGLU einsums with the local (El, D, Fm) / (El, Fm, D) weights; psum over `model`
             (the F contraction is split over it);
          4. the inverse all-to-all -> (E, Gl, C, D), and the local gate-weighted combine.
        Weights enter gathered over `data` (FSDP) and sharded (expert, -, model).

        With context parallelism (cp = mesh context size > 1) the sequence stays sharded. Groups of
        cfg.capacity_group tokens never cross a shard edge (checked), so each device simply runs
        steps 1-4 on the groups of its own shard. Whole-sequence groups (capacity_group 0) span
        the shards: slots (`pos`, computed over whole sequences) are the same as without CP; each
        device dispatches its own tokens into a full-sequence buffer padded to
        Cp = cp * ceil(C / cp) slots, a reduce-scatter over `context` leaves each device Cp / cp
        slots filled by every shard's tokens (each slot has one token), steps 2-4 run on those,
        and an all-gather over `context` before the combine returns every slot's output to the
        device holding its token.
        """
        cfg = self.cfg
        e = cfg.num_experts
        names = set(mesh.axis_names)
        batch_axes = tuple(a for a in ("data", "expert") if a in names)
        model = "model" if "model" in names else None
        cp = mesh.shape.get("context", 1)
        tok = P(batch_axes, "context" if cp > 1 else None, None)
        span = cp > 1 and cfg.capacity_group == 0  # groups span the context shards
        c_buf = -(-c // cp) * cp if span else c

        def body(x, ids, pos, gates, wg, wu, wo):
            bl, ll, d = x.shape
            size = ll if span else n  # tokens per dispatch row: the local shard, or one group
            grouped = lambda a: a.reshape(bl * ll // size, size, *a.shape[2:])  # [Gl, S, ...]
            ids, pos, gates = grouped(ids), grouped(jnp.where(pos < c, pos, -1)), grouped(gates)
            xe = moe_ops.capacity_dispatch(grouped(x), ids, pos, c_buf, e, impl=impl)  # [E, Gl, Cb, D]
            if span:
                xe = jax.lax.psum_scatter(xe, "context", scatter_dimension=2, tiled=True)  # [E, Gl, Cb/cp, D]
            xe = jax.lax.all_to_all(xe, "expert", 0, 1, tiled=True)  # [El, ep*Gl, ., D]
            ye = _capacity_experts(xe, wg, wu, wo)  # [El, ep*Gl, ., D]
            if model is not None:
                ye = jax.lax.psum(ye, model)
            ye = jax.lax.all_to_all(ye, "expert", 1, 0, tiled=True)  # [E, Gl, ., D]
            if span:
                ye = jax.lax.all_gather(ye, "context", axis=2, tiled=True)  # [E, Gl, Cb, D]
            y = moe_ops.capacity_combine(ye, ids, pos, gates, c_buf, impl=impl)  # [Gl, S, D]
            return y.reshape(bl, ll, d)

        w_in, w_out = P("expert", None, model), P("expert", model, None)
        fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, tok, w_in, w_in, w_out), out_specs=tok)
        return fn(x, ids, pos, gates, *self._weights())

    def _dropless_expert_parallel(self, mesh, x, ids, gates, impl):
        """Dropless experts with the mesh axes manual: -> y (B, L, D).

        Each device sorts its own tokens' choices by expert and sends every row to the shard that
        holds its expert with a ragged all-to-all (`expert_parallel.dropless_experts`); that
        shard runs its El = E / ep experts with the local (El, D, Fm) / (El, Fm, D) weights, psums
        over `model`, and the inverse all-to-all brings the rows home for the gate-weighted sum.
        """
        cfg = self.cfg
        names = set(mesh.axis_names)
        batch_axes = tuple(a for a in ("data", "expert") if a in names)
        model = "model" if "model" in names else None
        # With context parallelism each device sends its own sequence shard's rows (exact: dropless).
        tok = P(batch_axes, "context" if mesh.shape.get("context", 1) > 1 else None, None)
        experts = functools.partial(
            expert_parallel.dropless_experts,
            num_experts=cfg.num_experts,
            ep=mesh.shape["expert"],
            impl=impl,
            model_axis=model,
        )

        def body(x, ids, gates, wg, wu, wo):
            bl, l, d = x.shape
            t = bl * l
            y = experts(x.reshape(t, d), ids.reshape(t, -1), gates.reshape(t, -1), wg, wu, wo)
            return y.reshape(bl, l, d)

        w_in, w_out = P("expert", None, model), P("expert", model, None)
        # No varying-axes type checks: Pallas kernel outputs (megablox, the row kernels) and the
        # real ragged all-to-all carry none, while its CPU emulation (the other platform branch)
        # does, and platform branches must agree in type.
        fn = jax.shard_map(
            body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok, check_vma=False
        )
        return fn(x, ids, gates, *self._weights())

    def _dropless(self, x, ids, gates, impl):
        cfg = self.cfg
        b, l, d = x.shape
        k, e = cfg.top_k, cfg.num_experts
        mesh = self._expert_parallel_mesh(b, kernels=impl == "pallas")
        if mesh is not None:
            return self._dropless_expert_parallel(mesh, x, ids, gates, impl)
        if impl == "xla" and jax.default_backend() == "cpu" and b * l * k <= SLOTTED_MAX_CHOICES:
            return self._dropless_slotted(x, ids, gates)
        xt = x.reshape(b * l, d)  # [T, D]
        order, sizes = moe_ops.sort_by_expert(ids.reshape(b * l, k), e)  # [T*K], [E]
        xs = moe_ops.permute(xt, order, k, impl=impl)  # [T*K, D]
        wg, wu, wo = self._weights()
        hg = None if wg is None else moe_ops.grouped_matmul(xs, wg, sizes, impl=impl)
        hu = moe_ops.grouped_matmul(xs, wu, sizes, impl=impl)
        h = activate(hg, hu)  # [T*K, F]
        ys = moe_ops.grouped_matmul(h, wo, sizes, impl=impl)  # [T*K, D]
        y = moe_ops.unpermute(ys, order, gates.reshape(b * l, k), impl=impl)  # [T, D]
        return y.reshape(b, l, d)

    def _dropless_slotted(self, x, ids, gates):
        """Dropless experts through capacity buffers, for few tokens on CPU (decode): x (B, L, D),
        ids/gates (B, L, K) -> y (B, L, D), equal to the sorted path up to summation order.

        At decode the sorted path's grouped matmul (`tiled.py`) slices a (D, F) weight out of the
        expert stack for every (row tile, expert) pair, and XLA:CPU copies each slice. Here every
        product is one einsum batched over the stack, which reads the weights in place:
          1. slot of each (token, choice) in its expert's queue, token-major (`capacity_positions`
             over all T tokens as one group), and the busiest expert's load;
          2. C = the smallest of `slot_buckets` that holds that load (`lax.switch` over one
             branch per bucket; the largest holds every choice), so nothing is dropped;
          3. dispatch into (E, 1, C, D) buffers -> experts -> gate-weighted combine.
        Costs E * C - T * K padded rows: 1.5x the routed FLOPs when the router is balanced. (Rounds
        of a fixed C instead read every expert weight again per round: slower on skewed routing.)
        """
        b, l, d = x.shape
        e, k = self.cfg.num_experts, self.cfg.top_k
        t = b * l
        ids, gates = ids.reshape(1, t, k), gates.reshape(1, t, k)  # one group of all T tokens
        pos = moe_ops.capacity_positions(ids, e)  # [1, T, K]
        buckets = slot_buckets(t * k, e)
        bucket = jnp.searchsorted(jnp.asarray(buckets), jnp.max(pos) + 1)  # busiest load fits
        xg, weights = x.reshape(1, t, d), self._weights()

        def experts_with(c):
            xe = moe_ops.capacity_dispatch(xg, ids, pos, c, e)  # [E, 1, C, D]
            ye = _capacity_experts(xe, *weights)  # [E, 1, C, D]
            return moe_ops.capacity_combine(ye, ids, pos, gates, c)  # [1, T, D]

        y = jax.lax.switch(bucket, [functools.partial(experts_with, c) for c in buckets])
        return y.reshape(b, l, d)

    # ------------------------------------------------------------------------------------- forward
    def __call__(self, x: jax.Array, valid: jax.Array | None = None):
        cfg = self.cfg
        b, l, _ = x.shape
        x = constrain(x.astype(cfg.dtype), ("batch", "seq", None))
        valid = jnp.ones((b, l), bool) if valid is None else valid.astype(bool)
        impl = pallas_kernels.resolve_impl(cfg.kernel_impl)

        ids, gates, aux, n_valid = self.route(x, valid)
        if cfg.capacity_factor > 0:
            y, dropped = self._capacity(x, ids, gates, valid, n_valid, impl)
        else:
            y, dropped = self._dropless(x, ids, gates, impl), jnp.zeros((), jnp.float32)
        aux["moe_dropped_fraction"] = dropped
        if cfg.num_shared_experts > 0:
            y = y + self._shared(x)
        y = constrain(y.astype(cfg.dtype), ("batch", "seq", None))
        return y, {key: aux[key].astype(jnp.float32) for key in AUX_KEYS}
