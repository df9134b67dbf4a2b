r"""Ahead-of-time compile of the real train step for a TPU slice, on this (CPU) host.

    python -m turbos_jax.aot --config=configs/tiny.py --topology=v5p:2x2x1 [--json]

Answers "does this config fit, and how much HBM does one step take per chip?" without the chips:

  1. `jax.experimental.topologies.get_topology_desc(TOPOLOGY, "tpu")` describes the slice's devices
     (needs libtpu: `pip install "jax[tpu]==0.10.2"`, or only `libtpu==0.0.42.*`; no TPU is used).
  2. The mesh comes from `config.mesh` over those devices, checked as in training.
  3. The abstract train state (parameters, AdamW state, step) gets the training shardings; the batch
     is (batch_size, seq_len) int32/float32 sharded over (data, expert).
  4. `jax.jit(train_step).lower(...).compile()` for the TPU: the same function the trainer runs,
     with `kernel_impl = "auto"` meaning the Pallas (Mosaic) kernels, as it does on a TPU host.
  5. `compiled.memory_analysis()` gives per-device bytes (arguments, outputs, temporaries, generated
     code, aliased); total = arguments + outputs + temporaries + generated code - aliased (the
     donated state's outputs reuse its buffers). `cost_analysis()` gives the step's FLOPs (per
     device, as XLA counts them). `fits` compares the total with the chip's HBM.
  6. When the TPU compiler itself refuses (RESOURCE_EXHAUSTED: out of HBM), the report has
     `fits: false`, `per_device_bytes: null` and the compiler's line in `error`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
from absl import app, flags
from ml_collections import config_flags

from turbos_jax import cli, sharding
from turbos_jax.config import ModelConfig, check_train_config

_CONFIG = _TOPOLOGY = _JSON = None  # absl flags, defined by define_flags() (not on import)


def define_flags() -> None:
    """This command's absl flags, defined when it runs as `python -m turbos_jax.aot`: importing the
    module defines none (other entry points define --config too)."""
    global _CONFIG, _TOPOLOGY, _JSON
    if _CONFIG is not None:
        return
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    _TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:2x2x1, v4:2x2x1, v6e:2x2.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def configure_host() -> None:
    """Process-wide settings for compiling on a host that only targets the TPU; `main` calls it, a
    program calling `analyse` itself calls it first (before anything starts a JAX backend):
    JAX runs on the CPU here (the TPU is only a compile target, even on a TPU VM), and libtpu, loaded to
    describe the slice, is told not to look for this VM's TPU metadata and workers (it prints warnings
    and errors about them otherwise). Values already set in the environment are kept."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


GiB = 1024**3
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5litepod": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}


class AotError(cli.UserError):
    """The topology cannot be described or compiled for (libtpu missing, unknown name)."""


def topology_devices(topology: str):
    from jax.experimental import topologies

    if ":" not in topology:
        raise AotError(f"--topology={topology!r}: expected CHIP:SHAPE, e.g. v5p:2x2x1")
    try:
        return topologies.get_topology_desc(topology, "tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu's errors are plain RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(
            f"--topology={topology!r}: cannot describe the TPU slice ({first}); "
            "it needs libtpu: pip install 'jax[tpu]==0.10.2'"
        ) from e


def analyse(config, topology: str) -> dict:
    """Compiles one train step of `config` for `topology` -> the report dict (see module doc)."""
    from turbos_jax.step import abstract_batch, build_train_program

    model_cfg = ModelConfig.from_config(config.model)
    if model_cfg.kernel_impl == "auto":  # "auto" means the kernels of the platform compiled for
        model_cfg = dataclasses.replace(model_cfg, kernel_impl="pallas")
    check_train_config(config)
    devices = topology_devices(topology)
    mesh = sharding.train_mesh(config, model_cfg, devices)
    program = build_train_program(config, model_cfg, mesh)  # the trainer's own step
    batch = abstract_batch(config, program.batch_sharding)
    with jax.set_mesh(mesh):
        state = sharding.sharded_abstract(program.setup.abstract_state, mesh)
        step = program.train_step
        try:
            compiled = step.lower(state, batch).compile()
        except Exception as e:  # noqa: BLE001 - Mosaic/XLA raise several exception types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in first:
                compiled, error = None, first
            elif model_cfg.kernel_impl == "pallas":
                # A kernel that cannot tile some new shape is a config problem for the user:
                # say which switch avoids it rather than print a compiler traceback.
                raise AotError(
                    f"--topology={topology}: the step with config.model.kernel_impl="
                    f"{config.model.kernel_impl} (Pallas kernels) does not compile: "
                    f"{type(e).__name__}: {first[:300]}; --config.model.kernel_impl=xla "
                    "compiles it with the reference ops"
                ) from e
            else:
                raise

    chip = topology.split(":")[0].lower()
    hbm = HBM_BYTES.get(chip)
    report = {
        "topology": topology,
        "devices": len(devices),
        "device_kind": getattr(devices[0], "device_kind", "unknown"),
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "hbm_bytes": hbm,
    }
    if compiled is None:  # the TPU compiler itself proved it does not fit
        return report | {"per_device_bytes": None, "flops_per_device": None, "fits": False, "error": error}

    mem = compiled.memory_analysis()
    per_device = {
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "temporaries": int(mem.temp_size_in_bytes),
        "generated_code": int(mem.generated_code_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
    }
    per_device["total"] = (
        per_device["arguments"]
        + per_device["outputs"]
        + per_device["temporaries"]
        + per_device["generated_code"]
        - per_device["aliased"]
    )
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return report | {
        "per_device_bytes": per_device,
        "flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "kernel_impl": model_cfg.kernel_impl,
        "mosaic_kernel_calls": hlo.count('custom_call_target="tpu_custom_call"'),
        "collectives": count_collectives(hlo),
        "fits": None if hbm is None else per_device["total"] <= hbm,
    }


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Cross-device collectives in a compiled program's HLO text, by kind: each op counted once
    (an async pair `all-gather-start` / `-done` is one all-gather). Shows, e.g., that context
    parallelism's state exchange and K/V gathers are in the program, and how many there are (a
    scanned layer body counts once, however many layers it runs)."""
    counts = {}
    for kind in COLLECTIVES:
        pattern = rf"\s{re.escape(kind)}(?:-start)?\("
        counts[kind] = len(re.findall(pattern, hlo_text))
    return counts


def format_table(r: dict) -> str:
    gib = lambda b: f"{b / GiB:10.3f} GiB"
    lines = [
        f"topology   {r['topology']} ({r['devices']} devices, {r['device_kind']})",
        f"mesh       {r['mesh']}",
        f"batch      {r['batch_size']} x {r['seq_len']}",
        "per device:",
    ]
    if r["per_device_bytes"] is None:
        lines.append(f"  does not compile: {r['error']}")
    else:
        lines += [f"  {k:<15}{gib(v)}" for k, v in r["per_device_bytes"].items()]
    if r["flops_per_device"] is not None:
        lines.append(f"FLOPs/step per device  {r['flops_per_device']:.4g}")
    if "kernel_impl" in r:
        lines.append(f"kernels    {r['kernel_impl']} ({r['mosaic_kernel_calls']} Mosaic calls)")
    if r.get("collectives"):
        lines.append("collectives " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()))
    if r["hbm_bytes"] is None:
        lines.append("HBM        unknown chip: no fit verdict")
    else:
        lines.append(f"HBM        {gib(r['hbm_bytes'])}  fits: {r['fits']}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_host()
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise app.UsageError(
            "--config and --topology are required, e.g. --config=configs/tiny.py --topology=v5p:2x2x1"
        )
    r = analyse(_CONFIG.value, _TOPOLOGY.value)
    print(json.dumps(r, indent=2) if _JSON.value else format_table(r))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
