"""Prints a model config's size, FLOPs and cache footprint without allocating it.

    python -m turbos_jax.summary --config=configs/turbos.py [--seq_len=4096] [--json]

Layer counts, total and per-token-active parameters (with a per-layer-type breakdown), training
FLOPs per token, KV-cache bytes per token and Mamba2 state bytes per sequence. Shapes come from
`nnx.eval_shape`, so the 560B config runs in seconds on a laptop.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from turbos_jax import accounting, cli
from turbos_jax.config import ModelConfig

_CONFIG = _SEQ_LEN = _JSON = None  # absl flags, defined by define_flags() (not on import)


def define_flags() -> None:
    """This command's absl flags, defined when it runs as `python -m turbos_jax.summary`: importing
    the module defines none (other entry points define --config too)."""
    global _CONFIG, _SEQ_LEN, _JSON
    if _CONFIG is not None:
        return
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    _SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Sequence length for the FLOP count.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(s: dict) -> str:
    lay, dt = s["layout"], s["cache_dtypes"]
    lines = [
        f"layers        {s['num_layers']}  ("
        + ", ".join(f"{kind} {n}" for kind, n in s["layers"].items())
        + ")",
        f"scan          {lay['prefix'] or '-'} + [{lay['period']}] x {lay['repeats']} + "
        f"{lay['suffix'] or '-'}",
        f"params total  {_human(s['params_total'])}  ({s['params_total']:,})",
        f"params active {_human(s['params_active'])}  ({s['params_active']:,})",
        "by kind:",
        *(
            f"  {k:<12}{_human(v):>10}  {100 * v / s['params_total']:5.1f}%"
            for k, v in s["params_by_kind"].items()
        ),
        f"training FLOPs/token at L={s['seq_len']}:",
        *(f"  {k:<12}{_human(v):>10}" for k, v in s["training_flops_per_token"].items()),
        f"KV cache      {s['kv_bytes_per_token']:,} bytes/token ({dt['kv']})",
        f"Mamba2 state  {s['mamba_bytes_per_sequence']:,} bytes/sequence "
        f"({dt['ssm']} SSM, {dt['conv']} conv)",
    ]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    cfg = ModelConfig.from_config(_CONFIG.value.model)
    s = accounting.summarize(cfg, _SEQ_LEN.value)
    print(json.dumps(s, indent=2) if _JSON.value else format_table(s))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
