"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or the environment.

Every process of a multi-host job must call `jax.distributed.initialize` before JAX touches a device;
afterwards `jax.devices()` lists the devices of all processes, a mesh can span hosts, and Orbax and
Grain see `jax.process_index()` / `jax.process_count()`. `maybe_initialize()` decides whether and how
to call it, in this order:

1. Flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (defined by
   `define_flags()`, which `python -m turbos_jax.train` calls; a program that never calls it has only
   the environment variables), each falling back to the environment variable
   `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`. If any is set the job is
   explicitly configured: the values are checked (a bad combination is a one-line
   `DistributedError` naming the flag or variable) and, for N > 1, passed to JAX. Values left unset
   are auto-detected by JAX only inside a cluster environment it knows (below); elsewhere they are
   required.
2. Nothing set: initialise (with JAX's own auto-detection) only inside a multi-process cluster
   environment -- a Cloud TPU VM slice with more than one worker (TPU_WORKER_HOSTNAMES /
   TPU_PROCESS_ADDRESSES, or the GCE metadata server's worker list), a Slurm job step with
   SLURM_NTASKS > 1, or an Open MPI job with OMPI_COMM_WORLD_SIZE > 1.
3. Otherwise (one machine, one process): do nothing; JAX runs single-process as usual.
"""

from __future__ import annotations

import glob
import os
import urllib.request
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from turbos_jax import cli

# This module's absl flags, defined by `define_flags()` when an entry point runs as a command (not on
# import: a notebook may import every module of the package in one process).
_COORDINATOR = _NUM_PROCESSES = _PROCESS_ID = None


def define_flags() -> None:
    """Defines --coordinator_address, --num_processes and --process_id (once per process); called by
    the `python -m turbos_jax.*` entry points that start multi-host jobs, before `cli.run`."""
    global _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID
    if _COORDINATOR is not None:
        return
    _COORDINATOR = flags.DEFINE_string(
        "coordinator_address",
        None,
        "HOST:PORT of process 0's coordination service, identical on every process (multi-host; "
        "default: $JAX_COORDINATOR_ADDRESS, or auto-detected on TPU pods / Slurm / Open MPI).",
    )
    _NUM_PROCESSES = flags.DEFINE_integer(
        "num_processes", None, "Number of processes in the job (default: $JAX_NUM_PROCESSES or auto)."
    )
    _PROCESS_ID = flags.DEFINE_integer(
        "process_id", None, "This process's index in [0, num_processes) (default: $JAX_PROCESS_ID or auto)."
    )


ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as Google PCI devices on a Cloud TPU VM
_METADATA_URL = (
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints"
)


class DistributedError(cli.UserError):
    """The multi-process settings are inconsistent or the coordination service was unreachable."""


def _setting(name: str, flag_value, environ) -> tuple[object, str]:
    """(value, how to name it in an error): the flag if given, else its environment variable."""
    if flag_value is not None:
        return flag_value, f"--{name}={flag_value}"
    raw = environ.get(ENV[name], "").strip()
    if not raw:
        return None, f"--{name}"
    if name == "coordinator_address":
        return raw, f"{ENV[name]}={raw}"
    try:
        return int(raw), f"{ENV[name]}={raw}"
    except ValueError:
        raise DistributedError(f"{ENV[name]}={raw!r}: must be an integer") from None


def _count(hosts: str) -> int:
    return len([h for h in hosts.split(",") if h.strip()])


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def tpu_present() -> bool:
    """Whether this host may have TPU chips attached, from the PCI bus and /dev only (no JAX backend is
    started, libtpu is not loaded). True on a Cloud TPU VM: its chips are Google PCI devices, exposed
    as /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later). Google's virtual NIC and NVMe disks (PCI
    classes 0x02 network and 0x01 storage) on a plain GCE VM do not count. Errs towards True: callers
    use False to skip TPU-only work."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        if _read(vendor) != _GOOGLE_PCI_VENDOR:
            continue
        pci_class = _read(os.path.join(os.path.dirname(vendor), "class"))
        if not pci_class.startswith(("0x01", "0x02")):
            return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _tpu_workers(environ) -> int:
    """Number of workers of the Cloud TPU slice this VM belongs to (0: not a TPU VM)."""
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return _count(hosts)
    if environ.get("TPU_SKIP_MDS_QUERY") is not None or not tpu_present():
        return 0
    try:  # a TPU VM: the metadata server lists every worker of the slice
        req = urllib.request.Request(_METADATA_URL, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return _count(r.read().decode())
    except OSError:
        return 1


def detect_cluster(environ=None) -> str | None:
    """The multi-process cluster environment JAX can configure itself from, or None."""
    environ = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if (
        all(k in environ for k in slurm)
        and environ["SLURM_NTASKS"].strip().isdigit()
        and int(environ["SLURM_NTASKS"]) > 1
    ):
        return "slurm"
    size = environ.get("OMPI_COMM_WORLD_SIZE", "").strip()
    if "OMPI_MCA_orte_hnp_uri" in environ and size.isdigit() and int(size) > 1:
        return "openmpi"
    if _tpu_workers(environ) > 1:
        return "tpu"
    return None


def resolve(
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    environ=None,
    cluster: str | None = "detect",
) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Raises DistributedError (one line naming the flag or variable) for an inconsistent combination.
    `cluster` is the detected cluster environment ("detect": look it up with `detect_cluster`).
    """
    environ = os.environ if environ is None else environ
    addr, addr_name = _setting("coordinator_address", coordinator_address, environ)
    n, n_name = _setting("num_processes", num_processes, environ)
    pid, pid_name = _setting("process_id", process_id, environ)

    if addr is None and n is None and pid is None:
        cluster = detect_cluster(environ) if cluster == "detect" else cluster
        return {} if cluster else None  # {}: let JAX detect everything
    if n is not None and n < 1:
        raise DistributedError(f"{n_name}: must be >= 1")
    if pid is not None and pid < 0:
        raise DistributedError(f"{pid_name}: must be >= 0")
    if pid is not None and n is None:
        raise DistributedError(f"{pid_name} was given without --num_processes (or JAX_NUM_PROCESSES)")
    if pid is not None and pid >= n:
        raise DistributedError(f"{pid_name}: must be < {n_name} (process ids are 0 ... {n - 1})")
    if addr is not None:
        host, _, port = str(addr).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"{addr_name}: must be HOST:PORT, e.g. 10.0.0.2:8476")
    if n == 1:
        return None  # an explicit single-process job
    if None in (addr, n, pid):
        cluster = detect_cluster(environ) if cluster == "detect" else cluster
        if not cluster:  # JAX could only fill the gaps from a cluster environment
            missing = [
                name
                for name, v in (
                    ("--coordinator_address", addr),
                    ("--num_processes", n),
                    ("--process_id", pid),
                )
                if v is None
            ]
            given = next(
                name for name, v in ((addr_name, addr), (n_name, n), (pid_name, pid)) if v is not None
            )
            raise DistributedError(
                f"{given} also needs {' and '.join(missing)} (or the matching "
                "JAX_* environment variables) outside a TPU pod / Slurm / MPI job"
            )
    return {
        k: v
        for k, v in (("coordinator_address", addr), ("num_processes", n), ("process_id", pid))
        if v is not None
    }


def maybe_initialize(*, verbose: bool = True) -> bool:
    """Initialises JAX's distributed runtime if this is a multi-process job (see the module
    docstring); returns whether it did. Call before anything touches a JAX device."""
    if jax.distributed.is_initialized():
        return True
    given = [f.value if f is not None else None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)]
    kwargs = resolve(*given)  # without define_flags(): the JAX_* environment variables only
    if kwargs is None:
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "auto-detected"
        raise DistributedError(f"jax.distributed.initialize({shown}) failed: {first}") from None
    if jax.default_backend() == "cpu" and jax.process_count() > 1:
        # On CPU the persistent compilation cache key includes a per-process topology fingerprint
        # and only process 0 writes entries, so on a rerun process 0 loads its programs from the
        # cache while the others recompile. Gloo's cross-process rendezvous waits only 30 s (fixed
        # in jaxlib), so that skew fails the first collective ("Gloo context initialization
        # failed: DEADLINE_EXCEEDED"). Compiling everywhere keeps the processes in step.
        jax.config.update("jax_enable_compilation_cache", False)
    if verbose:
        print(describe(), flush=True)
    return True


def describe() -> str:
    """One line: this process, its devices, and the whole job's devices."""
    local = jax.local_devices()
    kinds = sorted({d.device_kind for d in local})
    return (
        f"process {jax.process_index()}/{jax.process_count()}, local devices {len(local)} "
        f"({', '.join(kinds)}), global devices {jax.device_count()}"
    )


def define_workdir_command_flags() -> None:
    """The flags of a command over a config and a workdir (train, sft, rl): `--config` (an
    ml_collections file, `--config.KEY=VALUE` overrides), `--workdir`, and this module's multi-host
    flags. Called when such a command runs as `python -m ...`, never on import; a second call (a
    process that runs two commands' set-up) defines nothing."""
    if "workdir" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    define_flags()


def workdir_command_main(run: Callable[[Any, str], Any], example: str) -> Callable[[list[str]], None]:
    """The absl `main` of a command that runs `run(config, workdir)` from its `--config` and
    `--workdir` flags (train, sft, rl): rejects stray arguments and missing flags with a usage line
    naming `example`, quiets INFO logging unless --verbosity was given (Orbax logs every save at
    INFO), and initialises a multi-host job before anything touches a device."""

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        config, workdir = flags.FLAGS["config"].value, flags.FLAGS["workdir"].value
        if config is None or not workdir:
            raise app.UsageError(f"--config and --workdir are required, e.g. {example}")
        maybe_initialize()
        run(config, workdir)

    return main
