"""Parameter, FLOP and cache-size accounting, computed from abstract shapes (nothing is allocated).

FLOP convention (per token, a multiply-add = 2 FLOPs, training = 3 x forward: forward, and a
backward that costs twice the forward):
  1. Every matmul weight the token passes through costs 2 FLOPs per weight element: attention and
     Mamba2 projections, the router, the shared expert, top_k routed experts and the LM head. The
     embedding lookup costs nothing. Norm scales, biases, A_log, D and dt_bias are elementwise and
     ignored; the depthwise conv is counted (2 x K per channel).
  2. Causal attention: QK^T and PV over an average visible context of (L + 1) / 2 keys:
     2 x 2 x H x Dh x (L + 1) / 2.
  3. Mamba2 SSD scan with chunk Q, per token: C B^T within the chunk (2 Q N per group), the masked
     mixing of x (2 Q P per head), chunk states B^T x and state-to-output C h (2 N P each per head),
     and inter-chunk state passing (2 N P / Q per head).
Remat recomputation is not counted (model FLOPs, as MFU is usually quoted).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbos_jax.config import LAYER_SYMBOLS, ModelConfig

ROUTED_EXPERT_PARAMS = ("wi_gate", "wi_up", "wo")
# Elementwise parameters: no matmul FLOPs.
_ELEMENTWISE = ("scale", "dt_bias", "A_log", "D", "x_bias", "B_bias", "C_bias")


def abstract_model(cfg: ModelConfig):
    """The model with ShapeDtypeStruct leaves: `nnx.eval_shape` runs no initialiser."""
    from turbos_jax.model import TurbosModel  # model imports are heavy; keep accounting light

    return nnx.eval_shape(lambda: TurbosModel(cfg, rngs=nnx.Rngs(0)))


def _symbol_of(path, cfg: ModelConfig) -> str:
    """Layer symbol owning a state path, or the top-level module name."""
    split = cfg.layout_split
    head = str(path[0])
    if head in ("prefix", "period", "suffix"):
        return getattr(split, head)[int(path[1])]
    return head


@dataclasses.dataclass
class ParamCounts:
    total: int
    active: int
    by_kind: dict[str, int]  # A, M, F, embed, lm_head, final_norm
    routed_experts: int
    matmul_active: int  # weights a token multiplies through (FLOP rule 1), excl. conv


def count_params(cfg: ModelConfig, model=None) -> ParamCounts:
    model = abstract_model(cfg) if model is None else model
    state = nnx.state(model, nnx.Param)
    by_kind: dict[str, int] = {}
    routed = matmul = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        size = int(np.prod(leaf.get_value().shape))
        kind = _symbol_of(keys, cfg)
        by_kind[kind] = by_kind.get(kind, 0) + size
        name = str(keys[-1])
        if name in ROUTED_EXPERT_PARAMS:
            routed += size
        elif name not in _ELEMENTWISE and kind != "embed" and "conv1d" not in map(str, keys):
            matmul += size
    total = sum(by_kind.values())
    active_routed = routed * cfg.top_k // cfg.num_experts
    return ParamCounts(
        total=total,
        active=total - routed + active_routed,
        by_kind=by_kind,
        routed_experts=routed,
        matmul_active=matmul + active_routed,
    )


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of QK^T and PV for one causal attention layer, per token (rule 2)."""
    return 2 * 2 * cfg.num_heads * cfg.head_dim * (seq_len + 1) / 2


def ssd_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of one Mamba2 chunked scan plus its depthwise conv, per token (rule 3)."""
    q, n, p = cfg.mamba_chunk, cfg.mamba_d_state, cfg.mamba_head_dim
    h, g = cfg.mamba_heads, cfg.mamba_groups
    scan = 2 * q * n * g + 2 * q * p * h + 4 * n * p * h + 2 * n * p * h / q
    conv = 2 * cfg.mamba_conv * (h * p + 2 * g * n)
    return scan + conv


def training_flops_per_token(cfg: ModelConfig, seq_len: int, counts: ParamCounts | None = None):
    """Model FLOPs for one training token at sequence length `seq_len`, split by source."""
    counts = count_params(cfg) if counts is None else counts
    layers = cfg.layer_counts()
    fwd = {
        "matmul": 2.0 * counts.matmul_active,
        "attention": layers["A"] * attention_flops_per_token(cfg, seq_len),
        "mamba2_scan": layers["M"] * ssd_flops_per_token(cfg),
    }
    out = {k: 3.0 * v for k, v in fwd.items()}
    out["total"] = sum(out.values())
    return out


def cache_bytes(cfg: ModelConfig, kv_bytes: int = 2, ssm_bytes: int = 4, conv_bytes: int = 2):
    """Decode-cache sizes: KV bytes per token (all attention layers) and Mamba2 bytes per sequence
    (SSM state in fp32 by default, as the report keeps it, plus the K-1 conv taps)."""
    layers = cfg.layer_counts()
    kv = layers["A"] * 2 * cfg.num_kv_heads * cfg.head_dim * kv_bytes
    ssm = cfg.mamba_heads * cfg.mamba_head_dim * cfg.mamba_d_state * ssm_bytes
    conv_ch = cfg.mamba_heads * cfg.mamba_head_dim + 2 * cfg.mamba_groups * cfg.mamba_d_state
    conv = (cfg.mamba_conv - 1) * conv_ch * conv_bytes
    return {"kv_bytes_per_token": kv, "mamba_bytes_per_sequence": layers["M"] * (ssm + conv)}


def summarize(cfg: ModelConfig, seq_len: int) -> dict:
    """Everything `python -m turbos_jax.summary` prints, as a JSON-ready dict."""
    counts = count_params(cfg)
    split = cfg.layout_split
    return {
        "layers": cfg.layer_counts(),
        "num_layers": len(cfg.layout),
        "layout": {
            "prefix": split.prefix,
            "period": split.period,
            "repeats": split.repeats,
            "suffix": split.suffix,
        },
        "params_total": counts.total,
        "params_active": counts.active,
        "params_by_kind": {LAYER_SYMBOLS.get(k, k): v for k, v in counts.by_kind.items()},
        "params_routed_experts": counts.routed_experts,
        "seq_len": seq_len,
        "training_flops_per_token": training_flops_per_token(cfg, seq_len, counts),
        # The caches as generation allocates them (generation/cache.py): K/V in kv_cache_dtype,
        # the SSM state in ssm_state_dtype, the conv taps in the compute dtype.
        **cache_bytes(
            cfg,
            kv_bytes=jnp.dtype(cfg.kv_cache_dtype).itemsize,
            ssm_bytes=jnp.dtype(cfg.ssm_state_dtype).itemsize,
            conv_bytes=jnp.dtype(cfg.dtype).itemsize,
        ),
        "cache_dtypes": {
            "kv": jnp.dtype(cfg.kv_cache_dtype).name,
            "ssm": jnp.dtype(cfg.ssm_state_dtype).name,
            "conv": jnp.dtype(cfg.dtype).name,
        },
    }
