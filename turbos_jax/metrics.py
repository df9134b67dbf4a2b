"""Training metrics: JSONL + TensorBoard writer, throughput / MFU, and a console progress bar.

`MetricsWriter(workdir)` appends one JSON object per logged step to `workdir/metrics.jsonl` and
writes the same values as TensorBoard scalars (tensorboardX event files in `workdir`):
  * scalars: JSON numbers; non-finite floats are written as `null` (JSON has no NaN/Infinity) and
    as their real value to TensorBoard.
  * vectors (e.g. `moe_expert_load` (E,)): JSON lists; TensorBoard gets one scalar per index,
    `tag/0 .. tag/E-1` (a histogram when longer than `MAX_VECTOR_SCALARS`).
  * strings and bools: JSONL only (bools also as 0/1 scalars).
A resumed run passes `resume_step` (the checkpoint's step): JSONL lines after it are dropped and
TensorBoard is told to purge events after it, so the replayed steps are not logged twice.

MFU = achieved model FLOP/s per device / the device's dense bf16 peak. Model FLOPs per token come
from `accounting.training_flops_per_token` (3 x forward, remat recomputation not counted).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import time
from typing import NamedTuple

import numpy as np
import rich.console
import rich.progress

# Dense (no sparsity) bf16 peak FLOP/s of one JAX device. A JAX device is one chip on these TPUs
# (v4 / v5p run their two TensorCores as one megacore device). Sources, the vendors' spec sheets:
#   TPU v4 275 TFLOPs, v5e 197, v5p 459, v6e (Trillium) 918: cloud.google.com/tpu/docs/v4, /v5e,
#   /v5p, /v6e ("Peak compute per chip (bf16)").
#   NVIDIA H100 datasheet: BF16 Tensor Core 1,979 TFLOPS (SXM) and 1,513 (PCIe) *with sparsity*,
#   so 989 and 756 dense. NVIDIA H200 datasheet: 1,979 with sparsity (SXM) -> 989 dense.
PEAK_FLOPS = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "h100_sxm": 989e12,
    "h100_pcie": 756e12,
    "h200": 989e12,
}
# jax `device_kind` strings (lower-cased) -> PEAK_FLOPS key; first match wins.
_DEVICE_KIND_PATTERNS = (
    (r"^tpu v4$", "tpu_v4"),
    (r"^tpu v5 ?(lite|e)$", "tpu_v5e"),
    (r"^tpu v5p?$", "tpu_v5p"),
    (r"^tpu v6 ?(lite|e)$", "tpu_v6e"),
    (r"h100.*pcie", "h100_pcie"),
    (r"h100", "h100_sxm"),
    (r"h200", "h200"),
)
MAX_VECTOR_SCALARS = 64


def peak_flops_per_device(device) -> float | None:
    """Peak dense bf16 FLOP/s of a jax Device (or its `device_kind` string); None if unknown."""
    kind = getattr(device, "device_kind", device)
    kind = " ".join(str(kind).lower().split())
    for pattern, key in _DEVICE_KIND_PATTERNS:
        if re.search(pattern, kind):
            return PEAK_FLOPS[key]
    return None


class Throughput(NamedTuple):
    tokens_per_sec: float
    tflops_per_device: float  # achieved model TFLOP/s per device
    mfu: float | None  # fraction of peak (0..1); None when the peak is unknown

    def metrics(self) -> dict:
        """As metric entries, without MFU when it is unknown."""
        out = {"tokens_per_sec": self.tokens_per_sec, "tflops_per_device": self.tflops_per_device}
        return out if self.mfu is None else out | {"mfu": self.mfu}


def throughput(
    step_time_s: float, tokens_per_step: int, flops_per_token: float, num_devices: int, peak: float | None
) -> Throughput:
    """Tokens/s, model TFLOP/s per device and MFU of one step of `tokens_per_step` tokens."""
    if step_time_s <= 0 or num_devices <= 0:
        raise ValueError(f"step_time_s={step_time_s} and num_devices={num_devices} must be > 0")
    tokens_per_sec = tokens_per_step / step_time_s
    per_device = tokens_per_sec * flops_per_token / num_devices
    return Throughput(tokens_per_sec, per_device / 1e12, per_device / peak if peak else None)


# ---------------------------------------------------------------------- writer
def _finite_or_none(x):
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


def _json_value(value):
    """A metric value -> JSON-ready Python (numbers, null for non-finite, lists, str, bool)."""
    if isinstance(value, (str, bool)):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind in "biu":
        return arr.tolist()
    return _finite_or_none(arr.astype(np.float64).tolist())  # floats, bfloat16, ...


class _Closing:
    """Context-manager support for classes with `close()`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _tensorboardx():
    try:
        import tensorboardX
    except ImportError as e:
        raise ImportError(
            "MetricsWriter writes TensorBoard events with tensorboardX, which is not "
            "installed: pip install tensorboardX (or pass tensorboard=False)"
        ) from e
    return tensorboardX


class MetricsWriter(_Closing):
    """Appends `{"step": s, **metrics}` to WORKDIR/metrics.jsonl and logs TensorBoard scalars.

    Only the primary process writes (others accept and drop every call). Use as a context manager
    or call `close()`.
    """

    def __init__(
        self,
        workdir: str,
        *,
        is_primary: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.is_primary = is_primary
        self._file = self._tb = None
        if not is_primary:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            # A unique suffix: tensorboardX names files by the second, and a run resumed within the
            # same second would otherwise overwrite the previous file.
            suffix = f".{os.getpid()}.{time.time_ns()}"
            self._tb = _tensorboardx().SummaryWriter(logdir=workdir, purge_step=purge, filename_suffix=suffix)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return

        def kept(line):
            try:
                return json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                return False  # a torn last line from a killed run

        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if kept(line)]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        """Logs one step. Values: Python/NumPy/JAX scalars or 1-D arrays, bools, strings."""
        if not self.is_primary:
            return
        if self._file is None:
            raise RuntimeError("MetricsWriter is closed")
        step = int(step)
        record = {"step": step} | {k: _json_value(v) for k, v in metrics.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb_write(key, value, step)
            self._tb.flush()

    def _tb_write(self, key: str, value, step: int) -> None:
        if isinstance(value, str):
            return
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            self._tb.add_scalar(key, float(arr), step)
        elif arr.size <= MAX_VECTOR_SCALARS:
            for i, v in enumerate(arr.reshape(-1)):
                self._tb.add_scalar(f"{key}/{i}", float(v), step)
        else:
            self._tb.add_histogram(key, arr.reshape(-1), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tensorboard_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of `workdir`: tag -> [(step, value)] in file order. Reads the
    TFRecord framing directly (length u64, crc, payload, crc; CRCs not checked); ignores purges."""
    _tensorboardx()  # a clear error when it is missing
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(workdir)):
        if "tfevents" not in name:
            continue
        with open(os.path.join(workdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


# ---------------------------------------------------------------------- console
# Keys of the trainer's metrics (metrics.jsonl names) shown on the progress line, in order.
_FORMATS = {
    "loss": "loss {:.4f}",
    "learning_rate": "lr {:.3g}",
    "tokens_per_sec": "tok/s {:,.0f}",
    "mfu": "mfu {:.1%}",
}


class Progress(_Closing):
    """Console progress: a rich progress bar on a terminal, else one plain line per update."""

    def __init__(self, total_steps: int, initial_step: int = 0, *, file=None, enabled=True):
        self.total = int(total_steps)
        self.file = sys.stderr if file is None else file
        self.enabled = enabled
        self._bar = None
        if enabled and getattr(self.file, "isatty", lambda: False)():
            rp = rich.progress
            self._bar = rp.Progress(
                rp.TextColumn("step"),
                rp.MofNCompleteColumn(),
                rp.BarColumn(),
                rp.TimeElapsedColumn(),
                rp.TimeRemainingColumn(),
                rp.TextColumn("{task.fields[info]}"),
                console=rich.console.Console(file=self.file),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=self.total, completed=initial_step, info="")
            self._bar.start()

    def line(self, step: int, metrics: dict) -> str:
        parts = [f.format(float(np.asarray(metrics[k]))) for k, f in _FORMATS.items() if k in metrics]
        return " | ".join([f"step {int(step)}/{self.total}", *parts])

    def update(self, step: int, metrics: dict | None = None) -> None:
        if not self.enabled:
            return
        metrics = metrics or {}
        if self._bar is not None:
            info = self.line(step, metrics).partition(" | ")[2]
            self._bar.update(self._task, completed=int(step), info=info)
        else:
            print(self.line(step, metrics), file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
