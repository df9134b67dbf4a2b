"""Model configuration: the typed, validated view of `config.model` from an ml_collections file.

`ModelConfig.from_config(cfg.model)` is the only way model code receives settings. Every field must be
present in the config file (there are no defaults here, so nothing is hidden), unknown keys are
rejected, and each check raises a `ConfigError` whose one-line message names the offending key.

The layout is a string of layer symbols, one per layer (each with its own pre-norm and residual):
  A  grouped-query attention          M  Mamba2 mixer          F  MoE feed-forward
`split_layout` finds the longest stretch made of one repeated period; that period is built once as
stacked parameters and run with `lax.scan`, so 128 layers compile as one loop body. Layers before and
after the repeated stretch are built and run one by one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

LAYER_SYMBOLS = {"A": "attention", "M": "mamba2", "F": "moe"}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_mixer_outputs")
KERNEL_IMPLS = ("xla", "pallas", "auto")  # see pallas_kernels/__init__.py
EXPERT_PARALLEL = ("auto", "none")  # MoE dispatch across the mesh's expert axis (layers/moe.py)
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
    d_model: int
    norm_eps: float
    init_std: float
    # Attention.
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_alpha: float
    # Mamba2.
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    mamba_d_state: int
    mamba_chunk: int
    mamba_conv: int
    mamba_dt_limit: tuple[float, float]
    # MoE.
    num_experts: int
    top_k: int
    num_shared_experts: int
    expert_dim: int
    capacity_factor: float
    aux_loss_weight: float
    z_loss_weight: float
    expert_parallel: str
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
    def layout_split(self) -> LayoutSplit:
        return split_layout(self.layout)

    def layer_counts(self) -> dict[str, int]:
        return {s: self.layout.count(s) for s in LAYER_SYMBOLS}

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
    if config.on_nonfinite not in ("stop", "skip"):
        fail("on_nonfinite", "expected 'stop' or 'skip'")
    if not isinstance(config.compilation_cache_dir, str):
        fail("compilation_cache_dir", "expected a directory path, or '' for no cache")
    if not isinstance(config.init_from, str):
        fail("init_from", "expected a workdir path, or '' to start from scratch")
