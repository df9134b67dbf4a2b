"""Parameter mapping between Hugging Face tensors and turbos-jax leaves, both directions.

A `Rule` ties a few HF tensors of one layer to a few turbos-jax leaves of one block:
`to_jax(*hf arrays) -> leaf arrays` and its exact inverse `to_hf(*leaf arrays) -> hf arrays`. Most
rules are one tensor <-> one leaf (a transpose and reshape); fused HF tensors (Mamba2's in_proj
and conv1d, Granite's gate+up `input_linear`) split into several leaves, and per-expert HF tensors
stack into one leaf. Every HF key belongs to exactly one rule, and every leaf to exactly one.

Shapes: HF Linear weights are (out, in); D d_model, H/P Mamba2 heads/head_dim, G/N groups/state,
K conv width, Hq/Hk/Dh attention heads/KV heads/head_dim, E experts, I expert width, S shared
width, F dense FFN width, V vocabulary (Vp padded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from turbos_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    leaves: tuple[str, ...]  # paths inside the block (or the model, for top-level rules)
    keys: tuple[str, ...]  # HF tensor names
    to_jax: Callable[..., tuple[np.ndarray, ...]]
    to_hf: Callable[..., tuple[np.ndarray, ...]]


def _linear(leaf: str, key: str, shape: tuple[int, ...], in_axes: int = 1) -> Rule:
    """HF (out, in) weight <-> leaf of `shape` whose first `in_axes` axes are the inputs."""
    fan_in = int(np.prod(shape[:in_axes]))
    return Rule(
        (leaf,),
        (key,),
        lambda w: (np.asarray(w).T.reshape(shape),),
        lambda a: (np.asarray(a).reshape(fan_in, -1).T,),
    )


def _linear_out_first(leaf: str, key: str, shape: tuple[int, ...]) -> Rule:
    """HF (D, in...) weight <-> leaf (in..., D): output projections o_proj / out_proj / down."""
    return Rule(
        (leaf,),
        (key,),
        lambda w: (np.asarray(w).T.reshape(shape),),
        lambda a: (np.asarray(a).reshape(-1, shape[-1]).T,),
    )


def _same(leaf: str, key: str, shape: tuple[int, ...] | None = None) -> Rule:
    return Rule(
        (leaf,),
        (key,),
        lambda w: (np.asarray(w).reshape(shape or np.shape(w)),),
        lambda a: (np.asarray(a).reshape(-1) if shape else np.asarray(a),),
    )


def _split_rows(parts: list[tuple[int, tuple[int, ...]]], vector: bool = False):
    """(to_jax, to_hf) for an HF tensor whose rows (axis 0) hold `parts` back to back, each
    (rows, leaf shape after moving the HF tensor's other axis to the front); `vector`: the HF
    tensor is 1-D."""
    bounds = np.cumsum([0] + [rows for rows, _ in parts])

    def to_jax(w):
        w = np.asarray(w)
        return tuple(
            np.moveaxis(w[bounds[i] : bounds[i + 1]], 0, -1).reshape(shape)
            for i, (_, shape) in enumerate(parts)
        )

    def to_hf(*leaves):
        rows = [
            np.moveaxis(np.asarray(a).reshape(-1, rows), -1, 0)
            for a, (rows, _) in zip(leaves, parts, strict=True)
        ]
        out = np.concatenate(rows, axis=0)
        return (out.reshape(-1) if vector else out,)

    return to_jax, to_hf


def mamba_rules(p: str, cfg: ModelConfig) -> list[Rule]:
    """Mamba2 mixer with HF prefix `p` (e.g. "backbone.layers.0.mixer.")."""
    d, h, hp = cfg.d_model, cfg.mamba_heads, cfg.mamba_heads * cfg.mamba_head_dim
    pd, g, n, k = cfg.mamba_head_dim, cfg.mamba_groups, cfg.mamba_d_state, cfg.mamba_conv
    gn = g * n
    in_proj = _split_rows([(hp, (d, h, pd)), (hp, (d, h, pd)), (gn, (d, g, n)), (gn, (d, g, n)), (h, (d, h))])
    conv_w = _split_rows([(hp, (k, h, pd)), (gn, (k, g, n)), (gn, (k, g, n))])
    conv_b = _split_rows([(hp, (h, pd)), (gn, (g, n)), (gn, (g, n))], vector=True)
    layer = "layer/"
    return [
        Rule(
            tuple(layer + "in_proj/" + s for s in "zxBC") + (layer + "in_proj/dt",),
            (p + "in_proj.weight",),
            *in_proj,
        ),
        Rule(
            tuple(layer + "conv1d/" + s for s in "xBC"),
            (p + "conv1d.weight",),
            lambda w: conv_w[0](np.asarray(w)[:, 0, :]),  # (C, 1, K) -> (C, K)
            lambda *a: (conv_w[1](*a)[0][:, None, :],),
        ),
        Rule(tuple(layer + "conv1d/" + s + "_bias" for s in "xBC"), (p + "conv1d.bias",), *conv_b),
        _same(layer + "dt_bias", p + "dt_bias"),
        _same(layer + "A_log", p + "A_log"),
        _same(layer + "D", p + "D"),
        _same(layer + "norm/scale", p + "norm.weight", (h, pd)),
        _linear_out_first(layer + "out_proj", p + "out_proj.weight", (h, pd, d)),
    ]


def attention_rules(
    p: str, cfg: ModelConfig, q_norm: str | None = None, k_norm: str | None = None
) -> list[Rule]:
    d, hq, hk, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rules = [
        _linear("layer/q_proj", p + "q_proj.weight", (d, hq, dh)),
        _linear("layer/k_proj", p + "k_proj.weight", (d, hk, dh)),
        _linear("layer/v_proj", p + "v_proj.weight", (d, hk, dh)),
        _linear_out_first("layer/o_proj", p + "o_proj.weight", (hq, dh, d)),
    ]
    if q_norm:
        rules += [_same("layer/q_norm/scale", p + q_norm), _same("layer/k_norm/scale", p + k_norm)]
    return rules


def _stack_experts(leaf: str, keys: tuple[str, ...], shape: tuple[int, ...]) -> Rule:
    """Per-expert HF (out, in) weights <-> one (E, in, out) leaf."""
    return Rule(
        (leaf,),
        keys,
        lambda *ws: (np.stack([np.asarray(w).T for w in ws]).reshape(shape),),
        lambda a: tuple(np.asarray(e).T for e in np.asarray(a)),
    )


def _fused_experts(leaves: tuple[str, str], key: str, width: int) -> Rule:
    """Granite's (E, 2I, D) gate+up tensor <-> wi_gate, wi_up (E, D, I)."""
    return Rule(
        leaves,
        (key,),
        lambda w: (np.swapaxes(np.asarray(w)[:, :width], 1, 2), np.swapaxes(np.asarray(w)[:, width:], 1, 2)),
        lambda g, u: (np.concatenate([np.swapaxes(g, 1, 2), np.swapaxes(u, 1, 2)], axis=1),),
    )


def _gate_up(leaves: tuple[str, str], key: str, width: int) -> Rule:
    """A (2W, D) gate-then-up tensor <-> gate, up (D, W)."""
    return Rule(leaves, (key,), *_split_rows([(width, (-1, width)), (width, (-1, width))]))


def granite_ffn_rules(p: str, cfg: ModelConfig, symbol: str) -> list[Rule]:
    """Granite layer prefix `p` ("model.layers.i."): MoE + shared MLP (F) or the shared MLP alone (D)."""
    d = cfg.d_model
    if symbol == "D":
        f = cfg.mlp_dim
        return [
            _gate_up(("layer/gate", "layer/up"), p + "shared_mlp.input_linear.weight", f),
            _linear("layer/down", p + "shared_mlp.output_linear.weight", (f, d)),
        ]
    e, i, s = cfg.num_experts, cfg.expert_dim, cfg.shared_width
    moe = p + "block_sparse_moe."
    rules = [
        _linear("layer/router", moe + "router.layer.weight", (d, e)),
        _fused_experts(("layer/wi_gate", "layer/wi_up"), moe + "input_linear.weight", i),
        Rule(
            ("layer/wo",),
            (moe + "output_linear.weight",),
            lambda w: (np.swapaxes(np.asarray(w), 1, 2),),
            lambda a: (np.swapaxes(np.asarray(a), 1, 2),),
        ),
    ]
    if s:
        rules += [
            _gate_up(("layer/shared_gate", "layer/shared_up"), p + "shared_mlp.input_linear.weight", s),
            _linear("layer/shared_down", p + "shared_mlp.output_linear.weight", (s, d)),
        ]
    return rules


def nemotron_ffn_rules(p: str, cfg: ModelConfig, symbol: str) -> list[Rule]:
    """NemotronH mixer prefix `p`: relu2 MoE (F) or relu2 dense MLP (D)."""
    d = cfg.d_model
    if symbol == "D":
        f = cfg.mlp_dim
        return [
            _linear("layer/up", p + "up_proj.weight", (d, f)),
            _linear("layer/down", p + "down_proj.weight", (f, d)),
        ]
    e, i, s = cfg.num_experts, cfg.expert_dim, cfg.shared_width
    rules = [
        _linear("layer/router", p + "gate.weight", (d, e)),
        _same("layer/router_bias", p + "gate.e_score_correction_bias"),
        _stack_experts("layer/wi_up", tuple(f"{p}experts.{j}.up_proj.weight" for j in range(e)), (e, d, i)),
        _stack_experts("layer/wo", tuple(f"{p}experts.{j}.down_proj.weight" for j in range(e)), (e, i, d)),
    ]
    if s:
        rules += [
            _linear("layer/shared_up", p + "shared_experts.up_proj.weight", (d, s)),
            _linear("layer/shared_down", p + "shared_experts.down_proj.weight", (s, d)),
        ]
    return rules


def hunyuan_ffn_rules(p: str, cfg: ModelConfig) -> list[Rule]:
    """HunYuanMoEV1 MLP prefix `p` ("model.layers.i.mlp.")."""
    d, e, i, s = cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_width
    experts = lambda proj: tuple(f"{p}experts.{j}.{proj}_proj.weight" for j in range(e))
    return [
        _linear("layer/router", p + "gate.wg.weight", (d, e)),
        _stack_experts("layer/wi_gate", experts("gate"), (e, d, i)),
        _stack_experts("layer/wi_up", experts("up"), (e, d, i)),
        _stack_experts("layer/wo", experts("down"), (e, i, d)),
        _linear("layer/shared_gate", p + "shared_mlp.gate_proj.weight", (d, s)),
        _linear("layer/shared_up", p + "shared_mlp.up_proj.weight", (d, s)),
        _linear("layer/shared_down", p + "shared_mlp.down_proj.weight", (s, d)),
    ]


def block_rules(family: str, cfg: ModelConfig, layer: int, symbol: str, position: int) -> list[Rule]:
    """Rules of the block at layout `position` (= layer's `position`-th symbol) for HF layer `layer`."""
    if family in ("nemotron_h", "mamba2"):
        p = f"backbone.layers.{layer}."
        norm = [_same("norm/scale", p + "norm.weight")]
        mixer = p + "mixer."
        if symbol == "M":
            return norm + mamba_rules(mixer, cfg)
        if symbol == "A":
            return norm + attention_rules(mixer, cfg)
        return norm + nemotron_ffn_rules(mixer, cfg, symbol)
    p = f"model.layers.{layer}."
    norm = [
        _same(
            "norm/scale",
            p + ("input_layernorm.weight" if position == 0 else "post_attention_layernorm.weight"),
        )
    ]
    if family == "hunyuan_v1_moe":
        if symbol == "A":
            return norm + attention_rules(
                p + "self_attn.", cfg, "query_layernorm.weight", "key_layernorm.weight"
            )
        return norm + hunyuan_ffn_rules(p + "mlp.", cfg)
    if symbol == "M":
        return norm + mamba_rules(p + "mamba.", cfg)
    if symbol == "A":
        return norm + attention_rules(p + "self_attn.", cfg)
    return norm + granite_ffn_rules(p, cfg, symbol)


def top_rules(family: str, cfg: ModelConfig) -> list[Rule]:
    """Embedding, final norm and (untied) LM head. The vocabulary is padded with zero rows on import
    and stripped on export."""
    v, vp = cfg.vocab_size, cfg.padded_vocab
    pad = lambda w: np.concatenate([np.asarray(w), np.zeros((vp - v, w.shape[1]), w.dtype)]) if vp > v else w
    if family in ("nemotron_h", "mamba2"):
        embed, final = "backbone.embeddings.weight", "backbone.norm_f.weight"
    else:
        embed, final = "model.embed_tokens.weight", "model.norm.weight"
    rules = [
        Rule(("embed/embedding",), (embed,), lambda w: (pad(w),), lambda a: (np.asarray(a)[:v],)),
        _same("final_norm/scale", final),
    ]
    if not cfg.tie_embeddings:
        rules.append(
            Rule(
                ("lm_head/kernel",),
                ("lm_head.weight",),
                lambda w: (pad(w).T,),
                lambda a: (np.asarray(a)[:, :v].T,),
            )
        )
    return rules


def ignored_key(family: str, key: str) -> bool:
    """HF tensors that have no turbos-jax counterpart and are skipped on purpose."""
    return family == "nemotron_h" and key.startswith("mtp.")  # multi-token-prediction heads
