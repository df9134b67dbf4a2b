"""Float64 NumPy port of the GQA attention layer, written from its documented algorithm.

For each query head i (KV head i // (H / K)):
  q = x Wq, k = x Wk, v = x Wv; RMSNorm over head_dim of each q and k head with one shared scale;
  GPT-NeoX RoPE (pairs (j, j + Dh/2)) at each token's position within its segment, with NTK base
  theta * alpha ** (Dh / (Dh - 2)); scores q.k / sqrt(Dh); a key is visible iff it is at or before
  the query and in the same segment; softmax; out = probs v; y = concat_heads(out) Wo.

Weights (JAX layout): q_proj (D, H, Dh), k_proj / v_proj (D, K, Dh), o_proj (H, Dh, D),
q_norm / k_norm (Dh,).
"""

from __future__ import annotations

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def weights_from_jax(attn) -> dict[str, np.ndarray]:
    return {
        "q_proj": _f64(attn.q_proj[...]),
        "k_proj": _f64(attn.k_proj[...]),
        "v_proj": _f64(attn.v_proj[...]),
        "o_proj": _f64(attn.o_proj[...]),
        "q_norm": _f64(attn.q_norm.scale[...]),
        "k_norm": _f64(attn.k_norm.scale[...]),
    }


def segment_positions(segment_ids) -> np.ndarray:
    """Position of each token within its run of equal segment ids, (B, L)."""
    seg = np.asarray(segment_ids)
    pos = np.zeros(seg.shape, np.int64)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return pos


def rms_norm(v: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * scale


def rope(v: np.ndarray, pos: int, theta: float, alpha: float) -> np.ndarray:
    """Rotates one head vector v (Dh,) to position `pos`."""
    dh = v.shape[-1]
    half = dh // 2
    base = theta * alpha ** (dh / (dh - 2))
    out = np.empty_like(v)
    for j in range(half):
        angle = pos * base ** (-2.0 * j / dh)
        c, s = np.cos(angle), np.sin(angle)
        out[j] = v[j] * c - v[j + half] * s
        out[j + half] = v[j + half] * c + v[j] * s
    return out


def attention_forward(
    x,
    weights: dict,
    segment_ids,
    *,
    num_heads: int,
    num_kv_heads: int,
    rope_theta: float,
    rope_alpha: float,
    eps: float = 1e-5,
    qk_norm: str = "after_rope",
) -> np.ndarray:
    """x (B, L, D), segment_ids (B, L) -> (B, L, D), float64."""
    x = _f64(x)
    w = {k: _f64(v) for k, v in weights.items()}
    seg = np.asarray(segment_ids)
    pos = segment_positions(seg)
    bsz, length, d = x.shape
    dh = w["q_proj"].shape[-1]
    per_kv = num_heads // num_kv_heads
    y = np.zeros((bsz, length, d))
    for b in range(bsz):
        for i in range(num_heads):
            kvh = i // per_kv
            q = x[b] @ w["q_proj"][:, i, :]  # (L, Dh)
            k = x[b] @ w["k_proj"][:, kvh, :]
            v = x[b] @ w["v_proj"][:, kvh, :]
            if qk_norm == "before_rope":
                q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
            q = np.stack([rope(q[t], pos[b, t], rope_theta, rope_alpha) for t in range(length)])
            k = np.stack([rope(k[t], pos[b, t], rope_theta, rope_alpha) for t in range(length)])
            if qk_norm == "after_rope":
                q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
            out = np.zeros((length, dh))
            for t in range(length):
                visible = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
                scores = np.array([q[t] @ k[s] for s in visible]) / np.sqrt(dh)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                out[t] = probs @ v[visible]
            y[b] += out @ w["o_proj"][i]
    return y
