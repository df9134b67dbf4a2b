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

    def decode(self, x, cache, positions):
        """One token per sequence: x (B, 1, D), positions (B,) -> (x', updated cache)."""
        h = self.norm(x)
        if self.symbol == "A":
            h, cache = self.layer.decode(h, cache, positions)
        elif self.symbol == "M":
            h, cache = self.layer.decode(h, cache)
        elif self.symbol == "D":
            h, cache = self.layer(h), {}
        else:
            (h, _), cache = self.layer(h), {}
        return self._residual(x, h), cache


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
    # Layers run in the order of the forward pass; the period is always scanned. Parameters may be
    # int8 QTensors (generation/quantize.py): each layer is dequantised right before it runs.
    def _generation_layers(self, step, x, layer_caches):
        """Runs every layer: step(block, x, cache_or_None) -> (x, cache). layer_caches is None in
        prefill. Returns (x, new layer caches)."""
        from turbos_jax.generation.quantize import dequantize

        def live(module):
            graphdef, state = nnx.split(module)
            return nnx.merge(graphdef, dequantize(state))

        out = {"prefix": [], "period": [], "suffix": []}
        get = lambda part, i: None if layer_caches is None else layer_caches[part][i]
        for i, blk in enumerate(self.prefix):
            x, c = step(live(blk), x, get("prefix", i))
            out["prefix"].append(c)
        graphdefs = [nnx.split(b)[0] for b in self.period]
        states = [nnx.split(b)[1] for b in self.period]
        caches = None if layer_caches is None else layer_caches["period"]

        def body(x, inp):
            period_states, period_caches = inp
            new = []
            for j, (gd, st) in enumerate(zip(graphdefs, period_states, strict=True)):
                x, c = step(
                    nnx.merge(gd, dequantize(st)), x, None if period_caches is None else period_caches[j]
                )
                new.append(c)
            return x, new

        x, out["period"] = jax.lax.scan(body, x, (states, caches), length=self.cfg.layout_split.repeats)
        for i, blk in enumerate(self.suffix):
            x, c = step(live(blk), x, get("suffix", i))
            out["suffix"].append(c)
        return x, out, self._head(live)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, max_len: int, all_logits: bool = False):
        """Right-padded prompts tokens (B, L) int32 with real lengths (B,) (1 <= length <= L) ->
        (logits, cache). logits: (B, V) at each prompt's last real token, or (B, L, V) with
        `all_logits`. cache = {"layers": ..., "lengths": (B,) tokens cached per sequence}; KV
        caches are preallocated to `max_len` positions. Use a cfg with capacity_factor = 0."""
        lengths = lengths.astype(jnp.int32)
        step = lambda blk, x, _: blk.prefill(x, lengths, max_len)
        x, layers, lm_head = self._generation_layers(step, self.embed(tokens), None)
        h = self.final_norm(x)
        if not all_logits:
            h = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
        logits = lm_head(h)
        return (logits if all_logits else logits[:, 0]), {"layers": layers, "lengths": lengths}

    def decode_step(self, tokens: jax.Array, cache: dict):
        """tokens (B,) int32, the next token of each sequence -> (logits (B, V), cache advanced by
        one token). The token is placed at position cache["lengths"] of its sequence."""
        positions = cache["lengths"]
        step = lambda blk, x, c: blk.decode(x, c, positions)
        x, layers, lm_head = self._generation_layers(step, self.embed(tokens[:, None]), cache["layers"])
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
