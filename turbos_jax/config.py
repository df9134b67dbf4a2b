"""Model configuration: the typed, validated view of `config.model` from an ml_collections file.

`ModelConfig.from_config(cfg.model)` is the only way model code receives settings. Every field must be
present in the config file (there are no defaults here, so nothing is hidden), unknown keys are
rejected, and each check raises a `ConfigError` whose one-line message names the offending key.

The layout is a string of layer symbols, one per layer (each with its own pre-norm and residual):
  A  grouped-query attention    M  Mamba2 mixer    F  MoE feed-forward    D  dense feed-forward
`split_layout` finds the longest stretch made of one repeated period; that period is built once as
stacked parameters and run with `lax.scan`, so 128 layers compile as one loop body. Layers before and
after the repeated stretch are built and run one by one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

LAYER_SYMBOLS = {"A": "attention", "M": "mamba2", "F": "moe", "D": "mlp"}
POSITION_ENCODINGS = ("rope", "none")
QK_NORMS = ("before_rope", "after_rope", "none")
ACTIVATIONS = ("swiglu", "relu2")  # silu(x Wg) * (x Wu), or relu(x Wu)^2 (no gate)
ROUTER_SCORES = ("softmax", "sigmoid")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_mixer_outputs")
KERNEL_IMPLS = ("xla", "pallas", "auto")  # see pallas_kernels/__init__.py
EXPERT_PARALLEL = ("auto", "none")  # MoE dispatch across the mesh's expert axis (layers/moe.py)
MAMBA_CP_SCHEMES = ("parallel", "sequential")  # Mamba2 state exchange over `context` (context_parallel.py)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


@dataclasses.dataclass(frozen=True)
class LayoutSplit:
    """`layout == prefix + period * repeats + suffix`."""

    prefix: str
    period: str
    repeats: int
    suffix: str


def split_layout(layout: str) -> LayoutSplit:
    """Finds the period whose back-to-back repeats cover the most layers.

    Ties go to the shortest period, then the earliest start. A layout with no repeat at all is one
    period repeated once, so every layout scans at least one body.
    """
    n = len(layout)
    best = (0, 0, 0, 0)  # (covered, -period_len, -start, repeats)
    for start in range(n):
        for plen in range(1, n - start + 1):
            period = layout[start : start + plen]
            reps = 1
            while layout.startswith(period, start + reps * plen):
                reps += 1
            cand = (reps * plen, -plen, -start, reps)
            if reps >= 2 and cand > best:
                best = cand
    if best[0] == 0:
        return LayoutSplit(prefix="", period=layout, repeats=1, suffix="")
    covered, neg_len, neg_start, reps = best
    start, plen = -neg_start, -neg_len
    return LayoutSplit(
        prefix=layout[:start],
        period=layout[start : start + plen],
        repeats=reps,
        suffix=layout[start + covered :],
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Layout and sizes.
    layout: str
    vocab_size: int
    vocab_multiple: int
    d_model: int
    norm_eps: float
    init_std: float
    tie_embeddings: bool
    embedding_scale: float
    residual_scale: float
    logits_scale: float
    # Attention.
    num_heads: int
    num_kv_heads: int
    head_dim: int
    position_encoding: str
    rope_theta: float
    rope_alpha: float
    qk_norm: str
    attn_scale: float
    # Mamba2.
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    mamba_d_state: int
    mamba_chunk: int
    mamba_conv: int
    mamba_dt_limit: tuple[float, float]
    mamba_cp_scheme: str
    # MoE.
    num_experts: int
    top_k: int
    num_shared_experts: int
    expert_dim: int
    shared_expert_dim: int
    expert_activation: str
    router_score: str
    router_bias: bool
    renorm_topk: bool
    routed_scale: float
    capacity_factor: float
    capacity_group: int
    aux_loss_weight: float
    z_loss_weight: float
    expert_parallel: str
    # Dense FFN (layout symbol D).
    mlp_dim: int
    mlp_activation: str
    # Numerics and compilation.
    dtype: Any
    param_dtype: Any
    remat_policy: str
    scan_layers: bool
    kernel_impl: str
    # Generation caches (turbos_jax/generation).
    kv_cache_dtype: Any
    ssm_state_dtype: Any

    @classmethod
    def from_config(cls, cfg) -> ModelConfig:
        """Builds and validates from `config.model` (a ConfigDict or a plain mapping)."""
        data = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"config.model.{unknown[0]}: unknown key (known: {sorted(fields)})")
        missing = sorted(fields - set(data))
        if missing:
            raise ConfigError(f"config.model.{missing[0]}: required key is missing")
        for name in ("dtype", "param_dtype", "kv_cache_dtype", "ssm_state_dtype"):
            if data[name] not in DTYPES:
                raise ConfigError(f"config.model.{name}={data[name]!r}: expected one of {list(DTYPES)}")
            data[name] = DTYPES[data[name]]
        data["mamba_dt_limit"] = tuple(float(v) for v in data["mamba_dt_limit"])
        out = cls(**data)
        out.validate()
        return out

    # ------------------------------------------------------------------ derived values
    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and columns of the LM head: vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def shared_width(self) -> int:
        """Intermediate size of the shared expert (0 = none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_dim or self.num_shared_experts * self.expert_dim

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k in the attention softmax."""
        return self.attn_scale or self.head_dim**-0.5

    @property
    def layout_split(self) -> LayoutSplit:
        return split_layout(self.layout)

    def layer_counts(self) -> dict[str, int]:
        # A, M, F always (TurboS's three kinds); D only in layouts that have it (imported models).
        return {s: self.layout.count(s) for s in LAYER_SYMBOLS if s != "D" or s in self.layout}

    def capacity(self, tokens_per_group: int) -> int:
        """Expert buffer slots per group of tokens in capacity mode (see layers/moe.py)."""
        return max(1, math.ceil(self.capacity_factor * tokens_per_group * self.top_k / self.num_experts))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(key, msg):
            raise ConfigError(f"config.model.{key}={getattr(self, key)!r}: {msg}")

        if not self.layout:
            fail("layout", "empty layout")
        bad = sorted(set(self.layout) - set(LAYER_SYMBOLS))
        if bad:
            fail("layout", f"unknown layer symbol {bad[0]!r}; use {sorted(LAYER_SYMBOLS)}")
        for key in (
            "vocab_size",
            "d_model",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mamba_heads",
            "mamba_head_dim",
            "mamba_groups",
            "mamba_d_state",
            "mamba_chunk",
            "mamba_conv",
            "num_experts",
            "top_k",
            "expert_dim",
        ):
            if int(getattr(self, key)) <= 0:
                fail(key, "must be a positive integer")
        if self.num_shared_experts < 0:
            fail("num_shared_experts", "must be >= 0")
        for key in ("vocab_multiple",):
            if int(getattr(self, key)) <= 0:
                fail(key, "must be a positive integer (1 = no padding)")
        for key in ("shared_expert_dim", "mlp_dim"):
            if int(getattr(self, key)) < 0:
                fail(key, "must be >= 0")
        if "D" in self.layout and self.mlp_dim <= 0:
            fail("mlp_dim", "must be > 0 when the layout has dense FFN layers (D)")
        choices = (
            ("position_encoding", POSITION_ENCODINGS),
            ("qk_norm", QK_NORMS),
            ("expert_activation", ACTIVATIONS),
            ("mlp_activation", ACTIVATIONS),
            ("router_score", ROUTER_SCORES),
        )
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                fail(key, f"expected one of {allowed}")
        for key in ("tie_embeddings", "router_bias", "renorm_topk"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "expected True or False")
        for key in ("embedding_scale", "residual_scale", "logits_scale", "routed_scale"):
            if not 0 < getattr(self, key) < math.inf:
                fail(key, "must be a finite number > 0")
        if not 0 <= self.attn_scale < math.inf:
            fail("attn_scale", "must be >= 0 (0 = head_dim ** -0.5)")
        if self.router_score == "softmax" and self.router_bias:
            fail("router_bias", "a selection bias needs router_score='sigmoid'")
        if self.num_heads % self.num_kv_heads:
            fail("num_heads", f"must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            fail("head_dim", "must be even (RoPE rotates pairs)")
        if self.mamba_heads % self.mamba_groups:
            fail("mamba_heads", f"must be divisible by mamba_groups={self.mamba_groups}")
        if self.top_k > self.num_experts:
            fail("top_k", f"must be <= num_experts={self.num_experts}")
        if self.capacity_factor < 0:
            fail("capacity_factor", "must be >= 0 (0 selects dropless routing)")
        if not isinstance(self.capacity_group, int) or self.capacity_group < 0:
            fail("capacity_group", "must be an integer >= 0 (0 = one group per sequence)")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if self.rope_alpha < 1:
            fail("rope_alpha", "NTK alpha must be >= 1 (1 = no scaling)")
        lo, hi = self.mamba_dt_limit
        if not 0 <= lo < hi:
            fail("mamba_dt_limit", "expected (low, high) with 0 <= low < high")
        if self.norm_eps <= 0:
            fail("norm_eps", "must be > 0")
        if self.init_std <= 0:
            fail("init_std", "must be > 0")
        if self.aux_loss_weight < 0 or self.z_loss_weight < 0:
            fail("aux_loss_weight" if self.aux_loss_weight < 0 else "z_loss_weight", "must be >= 0")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"expected one of {REMAT_POLICIES}")
        if self.kernel_impl not in KERNEL_IMPLS:
            fail("kernel_impl", f"expected one of {KERNEL_IMPLS}")
        if self.mamba_cp_scheme not in MAMBA_CP_SCHEMES:
            fail("mamba_cp_scheme", f"expected one of {MAMBA_CP_SCHEMES}")
        if self.expert_parallel not in EXPERT_PARALLEL:
            fail("expert_parallel", f"expected one of {EXPERT_PARALLEL}")
        if not isinstance(self.scan_layers, bool):
            fail("scan_layers", "expected True or False")


def check_train_config(config) -> None:
    """Validates the run keys of a training config (model, data and optim check their own)."""

    def fail(key, msg):
        raise ConfigError(f"config.{key}={config[key]!r}: {msg}")

    for key in (
        "seed",
        "total_steps",
        "batch_size",
        "grad_accum_steps",
        "seq_len",
        "log_every_steps",
        "eval_every_steps",
        "eval_batches",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "on_nonfinite",
        "compilation_cache_dir",
        "init_from",
    ):
        if key not in config:
            raise ConfigError(f"config.{key}: required key is missing")
    for key in (
        "total_steps",
        "batch_size",
        "grad_accum_steps",
        "seq_len",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        if not isinstance(config[key], int) or config[key] <= 0:
            fail(key, "must be a positive integer")
    if config.batch_size % config.grad_accum_steps:
        fail("grad_accum_steps", f"must divide config.batch_size={config.batch_size}")
    for key in ("eval_every_steps", "eval_batches"):
        if not isinstance(config[key], int) or config[key] < 0:
            fail(key, "must be an integer >= 0")
    mesh = config.get("mesh") or {}
    check_capacity_group(config.model.get("capacity_group", 0), config.seq_len, mesh.get("context", 1))
    if config.on_nonfinite not in ("stop", "skip"):
        fail("on_nonfinite", "expected 'stop' or 'skip'")
    if not isinstance(config.compilation_cache_dir, str):
        fail("compilation_cache_dir", "expected a directory path, or '' for no cache")
    if not isinstance(config.init_from, str):
        fail(
            "init_from",
            "expected a workdir path, a parameters file (*.safetensors), or '' to start from scratch",
        )


def check_capacity_group(group: int, seq_len: int, context: int) -> None:
    """Capacity groups of `group` tokens must tile every sequence, and with context parallelism
    every context shard, so that no group crosses a shard edge (layers/moe.py)."""
    if not group:
        return
    if seq_len % group:
        raise ConfigError(f"config.model.capacity_group={group!r}: must divide config.seq_len={seq_len}")
    if context > 1 and (seq_len // context) % group:
        raise ConfigError(
            f"config.model.capacity_group={group!r}: must divide the context shard length "
            f"config.seq_len / config.mesh.context = {seq_len} / {context}"
        )
