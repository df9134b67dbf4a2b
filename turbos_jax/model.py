"""The TurboS language model: embedding -> hybrid layer stack -> RMSNorm -> LM head.

The stack follows `cfg.layout`, one symbol per layer (A attention, M Mamba2, F MoE FFN, D dense FFN);
every layer is pre-norm with a residual, x + residual_scale * layer(norm(x)). The LM head is its own
matrix, or the embedding table transposed (cfg.tie_embeddings). `split_layout` cuts the layout into
prefix + period * repeats + suffix:

  1. Each position of the period is built `repeats` times at once (`nnx.split_rngs` + `nnx.vmap`), so
     its parameters carry a leading stacked axis of size `repeats` (never sharded).
  2. The forward pass splits those stacked modules into graph + state and runs `jax.lax.scan` over the
     stacked state; the body merges one period and applies its layers in order. The 128-layer TurboS
     compiles one 18-layer body.
  3. Each layer runs under `jax.checkpoint` with the policy named by `cfg.remat_policy`.
  4. Prefix and suffix layers are ordinary modules applied one by one with the same remat.
  5. MoE layers return auxiliary statistics; they are summed through the scan and averaged over the
     MoE layers, and `aux_loss` = aux_loss_weight * load-balancing + z_loss_weight * z-loss.

Generation (docs/generation.md): `prefill` and `decode_step` run the same layers with KV / SSM
caches that mirror the prefix / stacked period / suffix structure (`turbos_jax/generation`).

Packed sequences: `segment_ids` (B, L) int32 label documents (0 = padding); attention and Mamba2 never
pass information between different ids, and RoPE positions restart at 0 in each document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.layers.attention import Attention
from turbos_jax.layers.embedding import Embed, LMHead
from turbos_jax.layers.mamba2 import Mamba2
from turbos_jax.layers.mlp import MLP
from turbos_jax.layers.moe import MoEFFN
from turbos_jax.layers.norms import RMSNorm

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_mixer_outputs": jax.checkpoint_policies.save_only_these_names("mixer_out"),
}
AUX_KEYS = ("moe_lb_loss", "moe_z_loss", "moe_dropped_fraction")


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, L) positions restarting at 0 wherever the segment id changes."""
    b, l = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Block(nnx.Module):
    """One layer: x + residual_scale * sublayer(RMSNorm(x)); `symbol` picks attention, Mamba2, MoE
    FFN or dense FFN."""

    def __init__(self, symbol: str, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.symbol = symbol
        self.norm = RMSNorm(
            (cfg.d_model,), ("embed",), eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
        )
        layer = {"A": Attention, "M": Mamba2, "F": MoEFFN, "D": MLP}[symbol]
        self.layer = layer(cfg, rngs=rngs)
        self.residual_scale = cfg.residual_scale

    def _residual(self, x, h):
        if self.residual_scale != 1.0:
            h = h.astype(jnp.float32) * self.residual_scale
        return x + h.astype(x.dtype)

    def __call__(self, x, segment_ids, positions):
        """x (B, L, D) -> (x', aux) where aux holds MoE statistics (empty for mixers)."""
        h = self.norm(x)
        aux = {}
        if self.symbol == "A":
            h = self.layer(h, segment_ids, positions)
        elif self.symbol == "M":
            h = self.layer(h, segment_ids)
        elif self.symbol == "D":
            h = self.layer(h)
        else:
            h, aux = self.layer(h, valid=segment_ids != 0)
        h = checkpoint_name(h, "mixer_out")
        return sharding.constrain(self._residual(x, h), ("batch", "seq", None)), aux

    # ------------------------------------------------------------------ generation
    def prefill(self, x, lengths, max_len: int):
        """Right-padded prompts x (B, L, D), lengths (B,) -> (x', cache of this layer).

        Attention and Mamba2 build their caches (see their `prefill`); MoE layers run dropless
        (the caller's cfg has capacity_factor = 0) with padding marked invalid, and cache nothing.
        """
        h = self.norm(x)
        if self.symbol == "A":
            h, cache = self.layer.prefill(h, lengths, max_len)
        elif self.symbol == "M":
            h, cache = self.layer.prefill(h, lengths)
        elif self.symbol == "D":
            h, cache = self.layer(h), {}
        else:
            valid = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
            (h, _), cache = self.layer(h, valid=valid), {}
        return self._residual(x, h), cache

    def prefill_chunk(self, x, cache, start, lengths, layer=None):
        """Positions start .. start + C - 1 of right-padded prompts, x (B, C, D), folded into this
        layer's cache (holding positions < start) -> (x', cache). Attention runs its decode over the
        cache (C tokens), Mamba2 its prefill from the carried state, MoE dropless with padding
        invalid. `layer`: index into the stacked caches of the scanned period (see `decode`)."""
        h = self.norm(x)
        if self.symbol == "A":
            h, cache = self.layer.decode(h, cache, jnp.full(lengths.shape, start, jnp.int32), layer)
        elif self.symbol == "M":
            h, own = self.layer.prefill(h, lengths, _own_cache(cache, layer), start)
            cache = _put_cache(cache, own, layer)
        elif self.symbol == "D":
            h, cache = self.layer(h), {}
        else:
            valid = start + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
            (h, _), cache = self.layer(h, valid=valid), {}
        return self._residual(x, h), cache

    def decode(self, x, cache, positions, layer=None):
        """One token per sequence: x (B, 1, D), positions (B,) -> (x', updated cache). `layer`:
        the cache leaves are the scanned period's stacks (leading `repeats` axis) and this layer
        owns index `layer`; attention writes and reads its slice in place (a step touches only the
        new slot and the filled blocks), the small Mamba2 state is sliced and written back."""
        h = self.norm(x)
        if self.symbol == "A":
            h, cache = self.layer.decode(h, cache, positions, layer)
        elif self.symbol == "M":
            h, own = self.layer.decode(h, _own_cache(cache, layer))
            cache = _put_cache(cache, own, layer)
        elif self.symbol == "D":
            h, cache = self.layer(h), {}
        else:
            (h, _), cache = self.layer(h), {}
        return self._residual(x, h), cache


def _own_cache(cache, layer):
    """A layer's cache: itself, or its slice `layer` of the stacked period caches."""
    return cache if layer is None else jax.tree.map(lambda a: a[layer], cache)


def _put_cache(cache, new, layer):
    """Inverse of `_own_cache`: the new layer cache, written back into the stack at `layer`."""
    return new if layer is None else jax.tree.map(lambda a, n: a.at[layer].set(n), cache, new)


def _stacked_block(symbol: str, repeats: int, cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(r):
        return Block(symbol, cfg, rngs=r)

    return make(rngs)


def _apply_block(graphdef, state, x, segment_ids, positions):
    return nnx.merge(graphdef, state)(x, segment_ids, positions)


class TurbosModel(nnx.Module):
    """tokens (B, L) int32 -> (logits (B, L, vocab) fp32, aux dict of fp32 scalars)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        split = cfg.layout_split
        self.embed = Embed(cfg, rngs=rngs)
        self.prefix = nnx.List([Block(s, cfg, rngs=rngs) for s in split.prefix])
        self.period = nnx.List([_stacked_block(s, split.repeats, cfg, rngs) for s in split.period])
        self.suffix = nnx.List([Block(s, cfg, rngs=rngs) for s in split.suffix])
        self.final_norm = RMSNorm(
            (cfg.d_model,), ("embed",), eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs
        )
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg, rngs=rngs)

    # ------------------------------------------------------------------ helpers
    def _head(self, live=lambda m: m):
        """The LM head as a function (B, L, D) -> logits; `live` maps a module to the one to run
        (generation dequantises it)."""
        return live(self.embed).attend if self.cfg.tie_embeddings else live(self.lm_head)

    def _remat(self, fn):
        if self.cfg.remat_policy == "none":
            return fn
        return jax.checkpoint(fn, policy=REMAT_POLICIES[self.cfg.remat_policy], static_argnums=(0,))

    def _aux_zero(self):
        zero = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
        return zero | {"moe_expert_load": jnp.zeros((self.cfg.num_experts,), jnp.float32)}

    def _run(self, apply, blocks_and_states, x, aux, segment_ids, positions):
        for graphdef, state in blocks_and_states:
            x, a = apply(graphdef, state, x, segment_ids, positions)
            if a:  # MoE layers only
                aux = {k: aux[k] + a[k] for k in aux}
        return x, aux

    # ------------------------------------------------------------------ forward
    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ):
        """tokens, segment_ids, positions: (B, L) int32. Missing segment ids mean one document per
        row; missing positions are derived from the segment ids."""
        return self.from_embeddings(self.embed(tokens), segment_ids, positions)

    def from_embeddings(
        self, x: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ):
        """The model after the embedding lookup: x (B, L, D) -> (logits, aux). Useful for soft
        prompts and for gradients with respect to positions of the input."""
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones(x.shape[:2], jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)
        apply = self._remat(_apply_block)
        aux = self._aux_zero()

        unstacked = lambda blocks: [nnx.split(b) for b in blocks]
        x, aux = self._run(apply, unstacked(self.prefix), x, aux, segment_ids, positions)

        graphdefs = [nnx.split(b)[0] for b in self.period]
        states = [nnx.split(b)[1] for b in self.period]

        def period_body(carry, period_states):
            x, aux = carry
            x, aux = self._run(
                apply, list(zip(graphdefs, period_states, strict=True)), x, aux, segment_ids, positions
            )
            return (x, aux), None

        repeats = cfg.layout_split.repeats
        if cfg.scan_layers:
            (x, aux), _ = jax.lax.scan(period_body, (x, aux), states, length=repeats)
        else:
            for i in range(repeats):
                (x, aux), _ = period_body((x, aux), jax.tree.map(lambda a, i=i: a[i], states))

        x, aux = self._run(apply, unstacked(self.suffix), x, aux, segment_ids, positions)
        logits = self._head()(self.final_norm(x))
        return logits, self._finish_aux(aux)

    # ------------------------------------------------------------------ generation
    # Caches follow the parameter structure: {"prefix": [per layer], "period": [per period position,
    # leaves stacked with a leading `repeats` axis], "suffix": [per layer]}; MoE layers hold {}.
    # Layers run in the order of the forward pass; the period is scanned, except in a decode step
    # given `period_layers` (the period unrolled over layers sliced beforehand, with the caches of
    # `unstack_period_cache`). Parameters may be int8 QTensors (generation/quantize.py): each layer
    # is dequantised right before it runs.
    def period_layers(self):
        """The scanned period's layers as `repeats` lists of Blocks, each with its own slice of the
        stacked parameters (int8 ones stay int8: dequantised in the step): sliced once, before a
        decode loop, so the steps do not slice them again (see `generation.api`)."""
        out = []
        for r in range(self.cfg.layout_split.repeats):
            row = []
            for blk in self.period:
                gd, st = nnx.split(blk)
                row.append(nnx.merge(gd, jax.tree.map(lambda a, r=r: a[r], st)))
            out.append(row)
        return out

    def unstack_period_cache(self, cache: dict) -> dict:
        """A cache whose period part is `repeats` lists of per-layer caches (the layout
        `decode_step(..., period_layers)` reads and returns) instead of stacks."""
        repeats = self.cfg.layout_split.repeats
        stacks = cache["layers"]["period"]
        period = [[jax.tree.map(lambda a, r=r: a[r], c) for c in stacks] for r in range(repeats)]
        return {"layers": cache["layers"] | {"period": period}, "lengths": cache["lengths"]}

    def _generation_layers(self, step, x, layer_caches, period_layers=None):
        """Runs every layer: step(block, x, cache, layer) -> (x, cache). Returns (x, new layer
        caches, LM head).

        Prefill (layer_caches None): each layer builds its cache (called with cache = layer = None)
        and the scan stacks the period's. With `period_layers` (and period caches per layer) the
        period runs unrolled, each layer on its own cache. Otherwise the caches are updated in
        place: the period's stacks are the scan's carry and each period layer gets the whole stack
        and its index `layer` (slicing a layer's KV cache out and stacking it back would copy all
        max_len slots every step)."""
        from turbos_jax.generation.quantize import dequantize

        def live(module):
            graphdef, state = nnx.split(module)
            return nnx.merge(graphdef, dequantize(state))

        out = {"prefix": [], "period": [], "suffix": []}
        get = lambda part, i: None if layer_caches is None else layer_caches[part][i]
        for i, blk in enumerate(self.prefix):
            x, c = step(live(blk), x, get("prefix", i), None)
            out["prefix"].append(c)
        graphdefs = [nnx.split(b)[0] for b in self.period]
        states = [nnx.split(b)[1] for b in self.period]
        repeats = self.cfg.layout_split.repeats
        blocks = lambda period_states: [
            nnx.merge(gd, dequantize(st)) for gd, st in zip(graphdefs, period_states, strict=True)
        ]
        if layer_caches is None:

            def build(x, period_states):
                new = []
                for blk in blocks(period_states):
                    x, c = step(blk, x, None, None)
                    new.append(c)
                return x, new

            x, out["period"] = jax.lax.scan(build, x, states, length=repeats)
        elif period_layers is not None:  # unrolled, caches per layer: [repeats][period position]
            for row, row_caches in zip(period_layers, layer_caches["period"], strict=True):
                new = []
                for blk, c in zip(row, row_caches, strict=True):
                    x, c = step(live(blk), x, c, None)
                    new.append(c)
                out["period"].append(new)
        else:

            def update(carry, inp):
                x, caches = carry
                period_states, r = inp
                caches = list(caches)
                for j, blk in enumerate(blocks(period_states)):
                    x, caches[j] = step(blk, x, caches[j], r)
                return (x, caches), None

            inputs = (states, jnp.arange(repeats, dtype=jnp.int32))
            (x, out["period"]), _ = jax.lax.scan(update, (x, layer_caches["period"]), inputs)
        for i, blk in enumerate(self.suffix):
            x, c = step(live(blk), x, get("suffix", i), None)
            out["suffix"].append(c)
        return x, out, self._head(live)

    def prefill(
        self,
        tokens: jax.Array,
        lengths: jax.Array,
        max_len: int,
        all_logits: bool = False,
        chunk: int | None = None,
    ):
        """Right-padded prompts tokens (B, L) int32 with real lengths (B,) (1 <= length <= L <=
        max_len) -> (logits, cache). logits: (B, V) at each prompt's last real token, or (B, L, V)
        with `all_logits`. cache = {"layers": ..., "lengths": (B,) tokens cached per sequence}; KV
        caches are preallocated to `max_len` positions. With `chunk` < L the prompt is folded into
        an empty cache `chunk` tokens at a time (`_prefill_chunks`): activations and attention
        blocks scale with the chunk, not L. Use a cfg with capacity_factor = 0."""
        lengths = lengths.astype(jnp.int32)
        if chunk is not None and chunk < tokens.shape[1]:
            return self._prefill_chunks(tokens, lengths, max_len, all_logits, chunk)
        step = lambda blk, x, _, __: blk.prefill(x, lengths, max_len)
        x, layers, lm_head = self._generation_layers(step, self.embed(tokens), None)
        h = self.final_norm(x)
        if not all_logits:
            h = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
        logits = lm_head(h)
        return (logits if all_logits else logits[:, 0]), {"layers": layers, "lengths": lengths}

    def _prefill_chunks(self, tokens, lengths, max_len, all_logits, chunk):
        """Chunked prefill, same result as the one-shot one:
        1. Pad the prompts to n = ceil(L / chunk) chunks; start from an all-zero cache.
        2. `lax.scan` over the chunks (one compiled body): embed chunk i (positions i * chunk ..),
           run every layer's `prefill_chunk` on the carried caches (attention: K/V written, then
           attend over the filled cache blocks; Mamba2: conv taps and SSM state carried over).
        3. Keep the logits of each row's last real token from the chunk holding it (or every
           chunk's logits with `all_logits`).
        """
        from turbos_jax.generation.cache import init_cache

        b, l = tokens.shape
        n = -(-l // chunk)
        chunks = jnp.pad(tokens, [(0, 0), (0, n * chunk - l)]).reshape(b, n, chunk).swapaxes(0, 1)
        layers = init_cache(self.cfg, b, max_len)["layers"]
        last = lengths - 1

        def body(carry, inp):
            layers, last_logits = carry
            toks, start = inp
            step = lambda blk, x, c, r: blk.prefill_chunk(x, c, start, lengths, r)
            x, layers, lm_head = self._generation_layers(step, self.embed(toks), layers)
            h = self.final_norm(x)  # (B, chunk, D)
            if all_logits:
                return (layers, last_logits), lm_head(h)
            local = jnp.clip(last - start, 0, chunk - 1)
            logits = lm_head(jnp.take_along_axis(h, local[:, None, None], axis=1))[:, 0]
            inside = (last >= start) & (last < start + chunk)
            return (layers, jnp.where(inside[:, None], logits, last_logits)), None

        logits0 = jnp.zeros((b, self.cfg.padded_vocab), jnp.float32)  # the LM head pads the vocab
        starts = jnp.arange(n, dtype=jnp.int32) * chunk
        (layers, logits), per_chunk = jax.lax.scan(body, (layers, logits0), (chunks, starts))
        cache = {"layers": layers, "lengths": lengths}
        if all_logits:
            return per_chunk.swapaxes(0, 1).reshape(b, n * chunk, -1)[:, :l], cache
        return logits, cache

    def decode_step(self, tokens: jax.Array, cache: dict, period_layers=None):
        """tokens (B,) int32, the next token of each sequence -> (logits (B, V), cache advanced by
        one token). The token is placed at position cache["lengths"] of its sequence. With
        `period_layers` (from `period_layers()`) the cache's period part is per layer
        (`unstack_period_cache`) and the period runs unrolled; same result."""
        positions = cache["lengths"]
        step = lambda blk, x, c, r: blk.decode(x, c, positions, r)
        x, layers, lm_head = self._generation_layers(
            step, self.embed(tokens[:, None]), cache["layers"], period_layers
        )
        logits = lm_head(self.final_norm(x))[:, 0]
        return logits, {"layers": layers, "lengths": positions + 1}

    def _finish_aux(self, aux):
        n_moe = max(1, self.cfg.layout.count("F"))
        aux = {k: v / n_moe for k, v in aux.items()}
        aux["aux_loss"] = (
            self.cfg.aux_loss_weight * aux["moe_lb_loss"] + self.cfg.z_loss_weight * aux["moe_z_loss"]
        )
        return aux


def init_model(cfg: ModelConfig, seed: int, mesh: jax.sharding.Mesh | None = None):
    """Initialises parameters without ever holding an unsharded copy: -> (graphdef, state).

    1. `nnx.eval_shape` builds the model abstractly (shapes, dtypes, logical axis names).
    2. With a mesh, the abstract state gives each parameter its NamedSharding.
    3. `jax.jit(init, out_shardings=...)` runs the initialisers, each device creating only its
       own shards (and compiling all initialisers into one program, which is also faster on CPU).
    """
    make = lambda: TurbosModel(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = None if mesh is None else sharding.named_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return graphdef, state
