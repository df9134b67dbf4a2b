"""Hugging Face `config.json` -> turbos-jax `config.model` values, per supported family.

Families (transformers `model_type`): GraniteMoeHybrid (`granitemoehybrid`), NemotronH
(`nemotron_h`), HunYuanMoEV1 (`hunyuan_v1_moe`), Mamba2 (`mamba2`). Layer mapping:

  granitemoehybrid  HF layer i -> symbols 2i (M or A) and 2i+1 (F, or D with 0 experts)
  hunyuan_v1_moe    HF layer i -> symbols 2i (A) and 2i+1 (F)
  nemotron_h        HF layer i -> symbol i (mamba M, attention A, moe F, mlp D)
  mamba2            HF layer i -> symbol i (M)

A value turbos-jax cannot represent (a projection bias, latent MoE projections, grouped top-k,
non-uniform per-layer top-k, another activation...) raises `UnsupportedCheckpointError` naming the
HF key. Keys of layer kinds the layout does not use get small valid sizes (never built).
"""

from __future__ import annotations

import math

from turbos_jax import cli

FAMILIES = ("granitemoehybrid", "nemotron_h", "hunyuan_v1_moe", "mamba2")
VOCAB_MULTIPLE = 128  # embedding / LM-head padding on import, so the `model` axis divides them
_MAMBA_LAYER = ("mamba", "linear_attention")
_ATTENTION_LAYER = ("attention", "full_attention")
_NEMOTRON_SYMBOL = {
    "mamba": "M",
    "linear_attention": "M",
    "attention": "A",
    "full_attention": "A",
    "moe": "F",
    "mlp": "D",
}
_NEMOTRON_PATTERN = {"M": "M", "*": "A", "E": "F", "-": "D"}


class UnsupportedCheckpointError(cli.UserError):
    """The checkpoint's config or tensors hold something turbos-jax cannot represent."""


def number(value) -> float:
    """A config.json float, including transformers 5's {"__float__": "Infinity"} encoding."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def _need(hf: dict, key: str, ok, rule: str) -> None:
    if key in hf and not ok(hf[key]):
        raise UnsupportedCheckpointError(f"config.json {key}={hf[key]!r}: unsupported ({rule})")


def _get(hf: dict, key: str):
    if key not in hf:
        raise UnsupportedCheckpointError(f"config.json: required key {key!r} is missing")
    return hf[key]


def family_of(hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedCheckpointError(
            f"config.json model_type={model_type!r}: unsupported (supported: {', '.join(FAMILIES)})"
        )
    return model_type


def _unused_kind_sizes() -> dict:
    """Sizes of layer kinds a layout lacks: valid, divisible by any mesh, never built."""
    return dict(
        num_heads=1,
        num_kv_heads=1,
        head_dim=2,
        position_encoding="none",
        rope_theta=10_000.0,
        rope_alpha=1.0,
        qk_norm="none",
        attn_scale=0.0,
        mamba_heads=1,
        mamba_head_dim=1,
        mamba_groups=1,
        mamba_d_state=1,
        mamba_chunk=1,
        mamba_conv=1,
        mamba_dt_limit=(0.0, math.inf),
        num_experts=1,
        top_k=1,
        num_shared_experts=0,
        expert_dim=1,
        shared_expert_dim=0,
        expert_activation="swiglu",
        router_score="softmax",
        router_bias=False,
        renorm_topk=True,
        routed_scale=1.0,
        mlp_dim=0,
        mlp_activation="swiglu",
    )


def _common(hf: dict, eps_key: str) -> dict:
    return dict(
        vocab_size=int(_get(hf, "vocab_size")),
        vocab_multiple=VOCAB_MULTIPLE,
        d_model=int(_get(hf, "hidden_size")),
        norm_eps=float(_get(hf, eps_key)),
        init_std=float(hf.get("initializer_range", 0.02)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        embedding_scale=1.0,
        residual_scale=1.0,
        logits_scale=1.0,
    )


def _rope(hf: dict) -> dict:
    """rope_theta / rope_alpha from `rope_parameters` (transformers 5), or the older `rope_scaling`
    (with "type") and flat `rope_theta` that original checkpoints' config.json files hold."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    alpha = float(params.get("alpha", 1.0)) if rope_type == "dynamic" else 1.0
    if rope_type not in ("default", "dynamic") or (rope_type == "dynamic" and "alpha" not in params):
        raise UnsupportedCheckpointError(
            f"config.json rope_parameters={params!r}: unsupported (plain RoPE or Hunyuan's NTK alpha only)"
        )
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    return dict(position_encoding="rope", rope_theta=theta, rope_alpha=alpha)


def _granite(hf: dict) -> dict:
    for key, want in (("attention_bias", False), ("mamba_proj_bias", False), ("mamba_conv_bias", True)):
        _need(hf, key, lambda v, want=want: v == want, f"turbos-jax needs {want}")
    _need(hf, "hidden_act", lambda v: v == "silu", "SwiGLU experts only")
    experts = int(hf.get("num_local_experts", 0))
    layout = ""
    for i, kind in enumerate(_get(hf, "layer_types")):
        if kind not in _MAMBA_LAYER + _ATTENTION_LAYER:
            raise UnsupportedCheckpointError(f"config.json layer_types[{i}]={kind!r}: unsupported")
        layout += ("M" if kind in _MAMBA_LAYER else "A") + ("F" if experts else "D")
    d, heads = int(hf["hidden_size"]), int(_get(hf, "num_attention_heads"))
    n_heads = int(_get(hf, "mamba_n_heads"))
    head_dim = hf.get("mamba_d_head", "auto")
    if head_dim == "auto":
        head_dim = int(hf.get("mamba_expand", 2)) * d // n_heads
    out = _common(hf, "rms_norm_eps") | dict(
        layout=layout,
        embedding_scale=float(hf.get("embedding_multiplier", 1.0)),
        residual_scale=float(hf.get("residual_multiplier", 1.0)),
        logits_scale=1.0 / float(hf.get("logits_scaling", 1.0)),
        num_heads=heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads")),
        head_dim=d // heads,
        attn_scale=float(hf.get("attention_multiplier", (d // heads) ** -0.5)),
        mamba_heads=n_heads,
        mamba_head_dim=int(head_dim),
        mamba_groups=int(hf.get("mamba_n_groups", 1)),
        mamba_d_state=int(_get(hf, "mamba_d_state")),
        mamba_chunk=int(_get(hf, "mamba_chunk_size")),
        mamba_conv=int(_get(hf, "mamba_d_conv")),
        mamba_dt_limit=tuple(number(v) for v in hf.get("time_step_limit") or (0.0, math.inf)),
    )
    if hf.get("position_embedding_type") == "rope":
        out |= _rope(hf)
    elif hf.get("position_embedding_type") not in (None, "nope"):  # IBM's files say "nope" for none
        raise UnsupportedCheckpointError(
            f"config.json position_embedding_type={hf['position_embedding_type']!r}: unsupported"
        )
    if experts:
        out |= dict(
            num_experts=experts,
            top_k=int(_get(hf, "num_experts_per_tok")),
            expert_dim=int(_get(hf, "intermediate_size")),
        )
        shared = int(hf.get("shared_intermediate_size", 0))
        if shared:
            out |= dict(num_shared_experts=1, shared_expert_dim=shared)
    else:
        out |= dict(mlp_dim=int(_get(hf, "shared_intermediate_size")), mlp_activation="swiglu")
    return out


def _nemotron_h(hf: dict) -> dict:
    if "layers_block_type" in hf:
        layout = "".join(_NEMOTRON_SYMBOL.get(k, "?") for k in hf["layers_block_type"])
        source = "layers_block_type"
    else:
        layout = "".join(_NEMOTRON_PATTERN.get(c, "?") for c in _get(hf, "hybrid_override_pattern"))
        source = "hybrid_override_pattern"
    if "?" in layout:
        raise UnsupportedCheckpointError(f"config.json {source}={hf[source]!r}: unsupported layer kind")
    for key in ("mlp_bias", "use_bias"):
        _need(hf, key, lambda v: not v, "no projection biases")
    _need(hf, "use_conv_bias", bool, "the conv bias is required")
    _need(hf, "moe_latent_size", lambda v: v is None, "latent MoE projections")
    _need(hf, "n_group", lambda v: v in (None, 1), "grouped top-k")
    _need(hf, "topk_group", lambda v: v in (None, 1), "grouped top-k")
    _need(hf, "mlp_hidden_act", lambda v: v == "relu2", "relu2 only")
    _need(hf, "mamba_hidden_act", lambda v: v == "silu", "silu only")
    _need(hf, "n_shared_experts", lambda v: v in (0, 1), "one shared expert of its own width")
    out = _common(hf, "layer_norm_epsilon") | dict(layout=layout)
    if "A" in layout:
        out |= dict(
            num_heads=int(_get(hf, "num_attention_heads")),
            num_kv_heads=int(_get(hf, "num_key_value_heads")),
            head_dim=int(_get(hf, "head_dim")),
        )
    if "M" in layout:
        out |= dict(
            mamba_heads=int(_get(hf, "mamba_num_heads")),
            mamba_head_dim=int(_get(hf, "mamba_head_dim")),
            mamba_groups=int(_get(hf, "n_groups")),
            mamba_d_state=int(_get(hf, "ssm_state_size")),
            mamba_chunk=int(_get(hf, "chunk_size")),
            mamba_conv=int(_get(hf, "conv_kernel")),
            # NemotronH ignores time_step_limit: its mixer clamps dt to (time_step_min, inf).
            mamba_dt_limit=(float(hf.get("time_step_min", 0.0)), math.inf),
        )
    if "F" in layout:
        shared = int(hf.get("moe_shared_expert_intermediate_size", 0)) if hf.get("n_shared_experts", 1) else 0
        out |= dict(
            num_experts=int(_get(hf, "n_routed_experts")),
            top_k=int(_get(hf, "num_experts_per_tok")),
            expert_dim=int(_get(hf, "moe_intermediate_size")),
            num_shared_experts=1 if shared else 0,
            shared_expert_dim=shared,
            expert_activation="relu2",
            router_score="sigmoid",
            router_bias=True,
            renorm_topk=bool(hf.get("norm_topk_prob", True)),
            routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
        )
    if "D" in layout:
        out |= dict(mlp_dim=int(_get(hf, "intermediate_size")), mlp_activation="relu2")
    return out


def _uniform(hf: dict, key: str) -> int:
    value = _get(hf, key)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedCheckpointError(f"config.json {key}={value!r}: unsupported (per-layer values)")
        value = value[0]
    return int(value)


def _hunyuan(hf: dict) -> dict:
    _need(hf, "attention_bias", lambda v: not v, "no attention bias")
    _need(hf, "mlp_bias", lambda v: not v, "no MLP bias")
    _need(hf, "hidden_act", lambda v: v == "silu", "SwiGLU only")
    _need(hf, "use_qk_norm", bool, "QK-norm is always on in HunYuanMoEV1")
    _need(hf, "use_cla", lambda v: not v, "cross-layer attention")
    if "num_shared_expert" in hf and _uniform(hf, "num_shared_expert") != 1:
        raise UnsupportedCheckpointError(
            f"config.json num_shared_expert={hf['num_shared_expert']!r}: unsupported"
        )
    d, heads = int(hf["hidden_size"]), int(_get(hf, "num_attention_heads"))
    width = int(_get(hf, "intermediate_size"))
    return (
        _common(hf, "rms_norm_eps")
        | dict(
            layout="AF" * int(_get(hf, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(_get(hf, "num_key_value_heads")),
            head_dim=int(hf.get("head_dim") or d // heads),
            qk_norm="after_rope",
            num_experts=_uniform(hf, "num_experts"),
            top_k=_uniform(hf, "moe_topk"),
            expert_dim=width,
            num_shared_experts=1,
            shared_expert_dim=width,
        )
        | _rope(hf)
    )


def _mamba2(hf: dict) -> dict:
    _need(hf, "use_bias", lambda v: not v, "no projection biases")
    _need(hf, "use_conv_bias", bool, "the conv bias is required")
    _need(hf, "hidden_act", lambda v: v == "silu", "silu only")
    return _common(hf, "layer_norm_epsilon") | dict(
        layout="M" * int(_get(hf, "num_hidden_layers")),
        mamba_heads=int(_get(hf, "num_heads")),
        mamba_head_dim=int(_get(hf, "head_dim")),
        mamba_groups=int(_get(hf, "n_groups")),
        mamba_d_state=int(_get(hf, "state_size")),
        mamba_chunk=int(_get(hf, "chunk_size")),
        mamba_conv=int(_get(hf, "conv_kernel")),
        mamba_dt_limit=tuple(number(v) for v in hf.get("time_step_limit") or (0.0, math.inf)),
    )


def model_values(hf: dict) -> dict:
    """config.model values for an HF config.json (dict): architecture keys only; numerics and
    compilation keys are the caller's."""
    builder = {"granitemoehybrid": _granite, "nemotron_h": _nemotron_h, "hunyuan_v1_moe": _hunyuan}
    return _unused_kind_sizes() | builder.get(family_of(hf), _mamba2)(hf)


def hf_layer_symbols(family: str, layer: int) -> tuple[int, ...]:
    """Layout positions of HF layer `layer`."""
    if family in ("granitemoehybrid", "hunyuan_v1_moe"):
        return (2 * layer, 2 * layer + 1)
    return (layer,)
