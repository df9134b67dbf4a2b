"""Float64 NumPy port of mamba_ssm's `Mamba2.forward`, written from its semantics, not its code.

Weights are in mamba_ssm's (PyTorch) layout, as a dict:
  in_proj_weight  (2*H*P + 2*G*N + H, D)  rows [z, x, B, C, dt]; nn.Linear, so proj = u @ W.T
  conv1d_weight   (H*P + 2*G*N, 1, K)     depthwise, channels [x, B, C]
  conv1d_bias     (H*P + 2*G*N,)
  dt_bias, A_log, D  (H,)
  norm_weight     (H*P,)                  RMSNormGated, group_size = H*P/G, norm_before_gate=False
  out_proj_weight (D, H*P)

`fused_from_jax(mixer)` builds that dict from the JAX module's split parameters; comparing this port
against the JAX module then pins the layout mapping documented in `turbos_jax/layers/mamba2.py`.

Packed sequences: `segment_ids` (B, L) play mamba_ssm's `seq_idx`. The SSM state resets where the id
changes between neighbours and conv taps only read tokens of the query token's segment.
"""

from __future__ import annotations

import numpy as np

INF = float("inf")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def silu(u: np.ndarray) -> np.ndarray:
    return u / (1.0 + np.exp(-u))


def softplus(u: np.ndarray) -> np.ndarray:
    return np.logaddexp(u, 0.0)


def fused_from_jax(mixer) -> dict[str, np.ndarray]:
    """The JAX `Mamba2` mixer's parameters as float64 arrays in mamba_ssm's fused torch layout."""
    get = lambda v: _f64(v[...])
    ip, cv = mixer.in_proj, mixer.conv1d
    d = get(ip["z"]).shape[0]

    def rows(w):  # (D, *out) -> (prod(out), D): nn.Linear stores W with y = u @ W.T
        return w.reshape(d, -1).T

    in_proj = np.concatenate([rows(get(ip[k])) for k in ("z", "x", "B", "C", "dt")], axis=0)

    def conv_channels(w):  # (K, *C) -> (prod(C), 1, K)
        return w.reshape(w.shape[0], -1).T[:, None, :]

    conv_w = np.concatenate([conv_channels(get(cv[k])) for k in ("x", "B", "C")], axis=0)
    conv_b = np.concatenate([get(cv[k + "_bias"]).reshape(-1) for k in ("x", "B", "C")], axis=0)
    out_proj = get(mixer.out_proj)  # (H, P, D)
    return {
        "in_proj_weight": in_proj,
        "conv1d_weight": conv_w,
        "conv1d_bias": conv_b,
        "dt_bias": get(mixer.dt_bias),
        "A_log": get(mixer.A_log),
        "D": get(mixer.D),
        "norm_weight": get(mixer.norm.scale).reshape(-1),
        "out_proj_weight": out_proj.reshape(-1, out_proj.shape[-1]).T,
    }


def causal_conv1d(
    u: np.ndarray, weight: np.ndarray, bias: np.ndarray, seq_idx: np.ndarray | None
) -> np.ndarray:
    """Depthwise causal conv, u (B, L, C), weight (C, 1, K), bias (C,) -> (B, L, C), no activation.

    out[b, t, c] = bias[c] + sum_k weight[c, 0, k] * u[b, t - (K - 1) + k, c] (cross-correlation
    with K - 1 zeros of left padding), counting only taps in the same segment as t.
    """
    bsz, length, _ = u.shape
    width = weight.shape[-1]
    out = np.empty_like(u)
    for b in range(bsz):
        for t in range(length):
            acc = bias.copy()
            for k in range(width):
                s = t - (width - 1) + k
                if s < 0 or (seq_idx is not None and seq_idx[b, s] != seq_idx[b, t]):
                    continue
                acc = acc + weight[:, 0, k] * u[b, s]
            out[b, t] = acc
    return out


def gated_rmsnorm(
    y: np.ndarray, z: np.ndarray, weight: np.ndarray, group_size: int, eps: float
) -> np.ndarray:
    """RMSNormGated(norm_before_gate=False): rmsnorm(y * silu(z)) per channel group, * weight."""
    g = y * silu(z)
    out = np.empty_like(g)
    for start in range(0, g.shape[-1], group_size):
        blk = g[..., start : start + group_size]
        rms = np.sqrt(np.mean(blk * blk, axis=-1, keepdims=True) + eps)
        out[..., start : start + group_size] = blk / rms
    return out * weight


def mamba2_forward(
    u,
    weights: dict,
    *,
    heads: int,
    head_dim: int,
    groups: int,
    d_state: int,
    eps: float = 1e-5,
    dt_limit=(0.0, INF),
    seq_idx=None,
) -> np.ndarray:
    """mamba_ssm `Mamba2.forward` (no cache): u (B, L, D) -> (B, L, D), all in float64."""
    u = _f64(u)
    w = {k: _f64(v) for k, v in weights.items()}
    h, p, g, n = heads, head_dim, groups, d_state
    d_inner = h * p
    seq_idx = None if seq_idx is None else np.asarray(seq_idx)
    bsz, length, _ = u.shape

    # in_proj -> [z, xBC, dt].
    zxbcdt = u @ w["in_proj_weight"].T
    assert zxbcdt.shape[-1] == 2 * d_inner + 2 * g * n + h, zxbcdt.shape
    z = zxbcdt[..., :d_inner]
    xbc = zxbcdt[..., d_inner : 2 * d_inner + 2 * g * n]
    dt = zxbcdt[..., 2 * d_inner + 2 * g * n :]

    # Depthwise causal conv + SiLU over [x, B, C], then split.
    xbc = silu(causal_conv1d(xbc, w["conv1d_weight"], w["conv1d_bias"], seq_idx))
    x = xbc[..., :d_inner].reshape(bsz, length, h, p)
    bmat = xbc[..., d_inner : d_inner + g * n].reshape(bsz, length, g, n)
    cmat = xbc[..., d_inner + g * n :].reshape(bsz, length, g, n)

    dt = softplus(dt + w["dt_bias"])
    lo, hi = dt_limit
    if (lo, hi) != (0.0, INF):
        dt = np.clip(dt, lo, hi)
    a = -np.exp(w["A_log"])

    # Sequential recurrence, one head at a time; head i reads group i // (H / G).
    heads_per_group = h // g
    y = np.zeros((bsz, length, h, p))
    for b in range(bsz):
        for i in range(h):
            grp = i // heads_per_group
            state = np.zeros((p, n))
            for t in range(length):
                if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    state = np.zeros((p, n))
                dti = dt[b, t, i]
                state = np.exp(dti * a[i]) * state + dti * np.outer(x[b, t, i], bmat[b, t, grp])
                y[b, t, i] = state @ cmat[b, t, grp] + w["D"][i] * x[b, t, i]

    y = gated_rmsnorm(y.reshape(bsz, length, d_inner), z, w["norm_weight"], d_inner // g, eps)
    return y @ w["out_proj_weight"].T
