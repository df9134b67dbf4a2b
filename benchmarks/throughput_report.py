"""The printed side of benchmarks/train_step_throughput.py: the machine line, the results table
(one row per implementation, with the turbos-jax / PyTorch ratios) and the --breakdown text.
"""

from __future__ import annotations

import os
import platform


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def table(results: list[dict]) -> str:
    jax_rows = [r for r in results if "jax_variant" in r]
    ratio_head = "turbos-jax / this" + (" (compiled / from cache)" if len(jax_rows) > 1 else "")
    head = (
        "implementation",
        "params",
        "active",
        "tokens/s",
        "step ms",
        "compile/warm-up s",
        ratio_head,
        "other procs' cores",
    )
    rows = []
    for r in results:
        how = "load" if r.get("jax_variant") == "cached" else "compile"
        warm = (
            f"{r['compile_s']:.1f} {how} + {r['warmup_s']:.1f} warm-up"
            if r["compile_s"] is not None
            else f"{r['warmup_s']:.1f} warm-up"
        )
        ratio = (
            " / ".join(f"{j['tokens_per_s'] / r['tokens_per_s']:.2f}x" for j in jax_rows if r not in jax_rows)
            or "-"
        )
        other = r["other_processes_cores"]
        rows.append(
            (
                r["implementation"],
                f"{r['params_total']:,}",
                f"{r['params_active']:,}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['step_ms']:.1f}",
                warm,
                ratio,
                "-" if other is None else f"{other:.2f}",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def breakdown_text(bd: dict) -> str:
    lines = [
        f"turbos-jax breakdown: forward {bd['forward_ms']:.1f} ms, forward+backward "
        f"{bd['forward_backward_ms']:.1f} ms (full step in the table adds clip + AdamW)"
    ]
    for sym, v in bd["layers"].items():
        lines.append(
            f"  layer {sym} x{v['count']}: forward {v['forward_ms']:.2f} ms, "
            f"forward+backward {v['forward_backward_ms']:.2f} ms each, "
            f"{v['count'] * v['forward_backward_ms']:.1f} ms in all"
        )
    lines.append(
        f"  final norm + LM head + CE, forward+backward: {bd['lm_head_ce_forward_backward_ms']:.2f} ms"
    )
    lines.append(f"  sum of isolated pieces: {bd['sum_of_layers_forward_backward_ms']:.1f} ms")
    if "xla_cost_analysis" in bd:
        c = bd["xla_cost_analysis"]
        lines.append("  XLA cost analysis of the step: " + ", ".join(f"{k} {v:.3g}" for k, v in c.items()))
    return "\n".join(lines)
