"""`python -m turbos_jax.aot`: AOT compile of the train step for a TPU slice on this CPU host.

With libtpu importable (`pip install "jax[tpu]==0.10.2"`, or TURBOS_TEST_LIBTPU_PATH=DIR holding a
`pip install --target DIR libtpu==0.0.42.*`) the tiny config is compiled for v5p:2x2x1 with expert
parallelism; without it, the command must fail with one line saying what is missing."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""
    extra = os.environ.get("TURBOS_TEST_LIBTPU_PATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "turbos_jax.aot", "--config=configs/tiny.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_aot_report_or_one_line_error():
    out = _run(
        "--topology=v5p:2x2x1",
        "--json",
        "--config.mesh.data=1",
        "--config.mesh.expert=2",
        "--config.mesh.model=1",
        "--config.mesh.context=2",
        "--config.seq_len=256",
    )
    have_libtpu = importlib.util.find_spec("libtpu") is not None or bool(
        os.environ.get("TURBOS_TEST_LIBTPU_PATH")
    )
    if not have_libtpu:
        assert out.returncode == 1
        assert (
            out.stderr.strip()
            .splitlines()[-1]
            .startswith("error: --topology='v5p:2x2x1': cannot describe the TPU slice")
        )
        assert "pip install 'jax[tpu]==0.10.2'" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["topology"] == "v5p:2x2x1" and r["devices"] == 4
    assert r["mesh"] == {"data": 1, "expert": 2, "model": 1, "context": 2}
    # Expert parallelism's all-to-alls and context parallelism's exchanges are in the TPU program:
    # the conv halo and sequential hops are collective-permutes, K/V and state summaries all-gathers.
    c = r["collectives"]
    assert c["all-to-all"] > 0 and c["collective-permute"] > 0 and c["all-gather"] > 0
    b = r["per_device_bytes"]
    assert (
        b["total"]
        == (b["arguments"] + b["outputs"] + b["temporaries"] + b["generated_code"] - b["aliased"])
        > 0
    )
    assert r["hbm_bytes"] == 95 * 1024**3 and r["fits"] is True
    assert r["flops_per_device"] > 0


def test_aot_says_when_a_config_does_not_fit():
    """The fit verdict can be False: the tiny layout at d_model 8192 and expert width 32768 needs
    ~184 GiB of temporaries per v5p chip (measured 2026-11-26), which the TPU compiler refuses."""
    from tpu_aot import skip_without_libtpu

    skip_without_libtpu()
    out = _run(
        "--topology=v5p:2x2x1",
        "--json",
        "--config.mesh.data=1",
        "--config.mesh.expert=2",
        "--config.mesh.model=2",
        "--config.model.d_model=8192",
        "--config.model.expert_dim=32768",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["fits"] is False
    if r["per_device_bytes"] is None:  # the compiler proved it: out of HBM
        assert r["error"].startswith("RESOURCE_EXHAUSTED") and "HBM" in r["error"]
    else:
        assert r["per_device_bytes"]["total"] > r["hbm_bytes"]


def test_aot_bad_topology_is_one_line():
    out = _run("--topology=v5p")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --topology='v5p': expected CHIP:SHAPE, e.g. v5p:2x2x1"
    )


_FAILING_KERNEL = """
import configs.tiny
from pallas_kernels import mamba2 as mamba2_ops
from turbos_jax import aot

aot.configure_host()  # what `main` does: JAX on the CPU, libtpu told this is no TPU VM
real = mamba2_ops.chunk_scan

def chunk_scan(*args, impl="xla", **kwargs):
    if impl == "pallas":
        raise NotImplementedError("block shape (8, 100) is not tileable\\nmore detail")
    return real(*args, impl=impl, **kwargs)

mamba2_ops.chunk_scan = chunk_scan
config = configs.tiny.get_config()
config.model.kernel_impl = "auto"
config.mesh.data, config.mesh.expert, config.mesh.model = 1, 2, 2
try:
    aot.analyse(config, "v5p:2x2x1")
except aot.AotError as e:
    print("AotError:", e)
"""


def test_aot_kernel_failure_is_one_line_error():
    """A Pallas kernel that cannot lower for the requested slice (simulated: the scan raises while
    the step is traced) is reported as one AotError line naming the switch that avoids it. In a
    subprocess: the test replaces the kernel module's function, and `aot.configure_host` changes
    process-wide settings."""
    import pytest

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("needs libtpu (pip install 'jax[tpu]')")
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", _FAILING_KERNEL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "AotError: --topology=v5p:2x2x1: the step with config.model.kernel_impl=auto (Pallas "
        "kernels) does not compile: NotImplementedError: block shape (8, 100) is not tileable; "
        "--config.model.kernel_impl=xla compiles it with the reference ops"
    )
