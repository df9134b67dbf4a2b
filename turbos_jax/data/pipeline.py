"""Train and eval iterators: split, shard, shuffle, tokenise, pack, mix by phase -> numpy batches.

Per source named in `config.data.mixture`:
  1. Held-out split: ceil(eval_fraction * N) documents, those with the smallest splitmix64 hash of
     their index, are the eval split; training never reads them. The hash is fixed (not derived from
     `config.seed`) so the held-out set is the same across seeds, runs and process counts.
  2. Process shard: process p of P reads training documents train[p::P] only.
  3. Shuffle (grain index shuffle, seed from config.seed, the source name and p), repeated forever
     with a fresh shuffle per epoch; tokenised (`config.data.worker_count` > 0: in grain worker
     processes via `mp_prefetch`) and packed into rows of seq_len + 1 tokens (`packing.py`).
Rows of the sources in the active phase are interleaved by `grain.IterDataset.mix` with the
phase's weights (deterministic, exact proportions: a weight is the share of rows, i.e. of tokens),
B rows per batch. The iterator counts its batches: batch i is step i, and at step s the phase is
the one with the largest first_step <= s. A source's row stream persists across phases (a phase
switch does not restart any source).

State (`get_state()`, JSON-serialisable): {"step", "phase", "weights" (active phase), "mix" (grain
mix state), "sources": {name: packer state}}. An iterator restored with `set_state` yields exactly
the batches the original would have. Checkpoint it with Orbax through grain's handler:
`ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))` / `CheckpointRestore(it)`.
Changing the mixture of a phase not yet reached is fine on resume; the active phase is re-entered
(fresh interleave, sources continuing) if its weights changed.

Eval: `make_eval_iterator` returns a fresh iterator of exactly `num_batches` (default
`config.eval_batches`) batches from the held-out split of the sources in the phase active at
`step` (default 0, so every evaluation sees the same batches), read in a fixed order and cycled if
the split is short. Process p reads held-out documents eval[p::P] (all of them if there are fewer
than P). Eval always tokenises in-process.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import math
import os
from typing import Any

import grain
import numpy as np

from turbos_jax.data.packing import PackIterator, Tokenize, rows_to_batch
from turbos_jax.data.sources import DataError, load_source
from turbos_jax.data.tokenizers import check_vocab, load_tokenizer

_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_EVAL_SALT = 0x7E57_D0C5  # fixed: the held-out set must not move with config.seed
_MASK64 = np.uint64(2**64 - 1)


# ------------------------------------------------------------------------- config checks
def process_index_and_count(process_index=None, process_count=None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, {process_count})")
    return int(process_index), int(process_count)


def local_batch_size(config, process_count: int) -> int:
    b = config.batch_size
    if not isinstance(b, int) or b < 1 or b % process_count:
        raise DataError(
            f"config.batch_size={b!r}: must be a positive multiple of the "
            f"{process_count} processes (each loads batch_size / process_count rows)"
        )
    if not isinstance(config.seq_len, int) or config.seq_len < 1:
        raise DataError(f"config.seq_len={config.seq_len!r}: must be a positive integer")
    return b // process_count


def parse_mixture(config) -> list[tuple[int, dict[str, float]]]:
    """`config.data.mixture` validated: [(first_step, {source: weight}), ...]."""
    mixture, sources = config.data.mixture, list(config.data.sources.keys())
    where = "config.data.mixture"
    if isinstance(mixture, str | bytes) or not hasattr(mixture, "__len__") or not mixture:
        raise DataError(
            f"{where}: must be a non-empty sequence of (first_step, {{source: weight}})"
            f" phases, got {mixture!r}"
        )
    phases = []
    for i, phase in enumerate(mixture):
        if not isinstance(phase, tuple | list) or len(phase) != 2 or not hasattr(phase[1], "keys"):
            raise DataError(f"{where}: phase {i} must be (first_step, {{source: weight}}), got {phase!r}")
        first, weights = phase
        if isinstance(first, bool) or not isinstance(first, int | np.integer) or first < 0:
            raise DataError(f"{where}: phase {i} first_step must be an integer >= 0, got {first!r}")
        if i == 0 and first != 0:
            raise DataError(f"{where}: the first phase must start at step 0, got {first}")
        if i and first <= phases[-1][0]:
            raise DataError(
                f"{where}: phase {i} starts at step {first}, not after phase "
                f"{i - 1} (step {phases[-1][0]}); first steps must increase"
            )
        if not weights:
            raise DataError(f"{where}: phase {i} names no sources")
        clean = {}
        for name in weights.keys():
            w = weights[name]
            if name not in sources:
                raise DataError(
                    f"{where}: phase {i} names source {name!r}, which is not in "
                    f"config.data.sources ({', '.join(sources)})"
                )
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < math.inf:
                raise DataError(f"{where}: phase {i} weight of {name!r} must be a positive number, got {w!r}")
            clean[str(name)] = float(w)
        phases.append((int(first), clean))
    return phases


def _eval_fraction(config) -> float:
    f = config.data.eval_fraction
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f < 1:
        raise DataError(f"config.data.eval_fraction={f!r}: must be a number in [0, 1)")
    return float(f)


def _worker_count(config) -> int:
    w = config.data.worker_count
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise DataError(f"config.data.worker_count={w!r}: must be an integer >= 0")
    return w


# ------------------------------------------------------------------------- documents
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def split_documents(n: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) document indices, sorted: ceil(eval_fraction * n) held out by a fixed hash."""
    k = min(n, math.ceil(eval_fraction * n)) if eval_fraction > 0 else 0
    h = _splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(_EVAL_SALT))
    held = np.sort(np.argpartition(h, k - 1)[:k]) if 0 < k < n else np.arange(k)
    return np.setdiff1d(np.arange(n), held), held


def _seed(*parts) -> int:
    """A 32-bit seed from ints and strings, stable across processes and Python versions."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


class Subset:
    """The documents of `source` at `indices` (a grain RandomAccessDataSource)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.source[int(self.indices[i])]


_SOURCES: dict[tuple, Any] = {}


def _cached_source(name: str, spec: str, text_key: str):
    """load_source, reused while the matched files are unchanged (eval rebuilds its iterator)."""
    pattern = os.path.expanduser(str(spec))
    paths = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern, recursive=True))
    files = tuple((p, s.st_size, s.st_mtime_ns) for p in paths if os.path.isfile(p) for s in [os.stat(p)])
    key = (name, spec, text_key, files)
    if key not in _SOURCES:
        if len(_SOURCES) >= 16:
            _SOURCES.clear()
        _SOURCES[key] = load_source(name, spec, text_key)
    return _SOURCES[key]


# ------------------------------------------------------------------------- mixing
class _Borrowed(grain.DatasetIterator):
    """A view of a live stream that a phase's mix draws from; closing (or garbage-collecting) the
    mix of a finished phase must not close the stream, which the next phase keeps reading."""

    def __init__(self, stream: grain.DatasetIterator):
        super().__init__()
        self._stream = stream

    def __next__(self):
        return next(self._stream)

    def get_state(self) -> dict[str, Any]:
        return self._stream.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._stream.set_state(state)


class _Running(grain.IterDataset):
    """A live stream as an IterDataset (each `iter` borrows it), for `grain.IterDataset.mix`."""

    def __init__(self, stream: grain.DatasetIterator):
        super().__init__()
        self._stream = stream

    def __iter__(self) -> grain.DatasetIterator:
        return _Borrowed(self._stream)


class MixtureIterator(grain.DatasetIterator):
    """Batches of B rows mixed from per-source row streams by the phase of the current step."""

    def __init__(
        self,
        streams: dict[str, grain.DatasetIterator],
        phases: list[tuple[int, dict[str, float]]],
        batch_size: int,
        num_batches: int | None = None,
    ):
        super().__init__(list(streams.values()))
        self._streams, self._phases = streams, phases
        self._firsts = [first for first, _ in phases]
        self._batch_size, self._num_batches = batch_size, num_batches
        self._step, self._phase, self._mix = 0, -1, None

    def _enter(self, phase: int) -> None:
        weights = self._phases[phase][1]
        names = sorted(weights)
        self._mix = grain.IterDataset.mix(
            [_Running(self._streams[n]) for n in names], [weights[n] for n in names]
        ).__iter__()
        self._phase = phase

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_batches is not None and self._step >= self._num_batches:
            raise StopIteration
        phase = bisect.bisect_right(self._firsts, self._step) - 1
        if phase != self._phase:
            self._enter(phase)
        rows = [next(self._mix) for _ in range(self._batch_size)]
        self._step += 1
        return rows_to_batch(rows)

    def get_state(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "phase": self._phase,
            "weights": self._phases[self._phase][1] if self._mix is not None else None,
            "mix": self._mix.get_state() if self._mix is not None else None,
            "sources": {n: it.get_state() for n, it in self._streams.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        for name, it in self._streams.items():  # sources new to the config start fresh
            if name in state["sources"]:
                it.set_state(state["sources"][name])
        self._step, self._phase, self._mix = int(state["step"]), -1, None
        phase = state["phase"]
        if (
            state["mix"] is not None
            and 0 <= phase < len(self._phases)
            and self._phases[phase][1] == state["weights"]
        ):
            self._enter(phase)
            self._mix.set_state(state["mix"])

    def __str__(self) -> str:
        return f"MixtureIterator(sources={sorted(self._streams)}, batch_size={self._batch_size})"


# ------------------------------------------------------------------------- public API
def _setup(config, process_index, process_count):
    pi, pc = process_index_and_count(process_index, process_count)
    batch = local_batch_size(config, pc)
    phases = parse_mixture(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_vocab(tokenizer, config.model.vocab_size)
    return pi, pc, batch, phases, tokenizer, _eval_fraction(config)


# Grain (0.2.x, with JAX's profiler hooks) reads this absl flag's value whenever a worker process's
# iterator starts (lazily, at the first element), with no fallback to the default: in a process that
# never parsed absl flags (a notebook, a test; the command-line entry points parse them) that raises
# UnparsedFlagAccessError.
_GRAIN_WORKER_PROFILING_FLAG = "grain_enable_multiprocess_worker_profiling"


def _let_grain_read_its_flag() -> None:
    """Before Grain starts worker processes where absl flags are unparsed: marks Grain's one flag that
    it reads unguarded as given (keeping its value, the default unless set), as Grain itself does for
    its debug flags in a worker. The process's flags stay unparsed (no `FLAGS.mark_as_parsed()`) and
    every other flag is untouched; a later `app.run` parses the command line as usual."""
    from absl import flags

    if not flags.FLAGS.is_parsed() and _GRAIN_WORKER_PROFILING_FLAG in flags.FLAGS:
        flag = flags.FLAGS[_GRAIN_WORKER_PROFILING_FLAG]
        flag.present = flag.present or 1


def _stream(name, docs: grain.MapDataset, n_docs, tokenizer, row_len, workers) -> PackIterator:
    ds = docs.map(Tokenize(tokenizer)).to_iter_dataset(_READ)
    if workers:
        _let_grain_read_its_flag()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return PackIterator(ds.__iter__(), row_len, max_empty=n_docs, name=name)


def make_train_iterator(
    config, *, process_index: int | None = None, process_count: int | None = None
) -> MixtureIterator:
    """Endless, checkpointable iterator of this process's training batches (see module doc)."""
    pi, pc, batch, phases, tokenizer, frac = _setup(config, process_index, process_count)
    workers = _worker_count(config)
    streams = {}
    for name in sorted({n for _, weights in phases for n in weights}):
        source = _cached_source(name, config.data.sources[name], config.data.text_key)
        train, _ = split_documents(len(source), frac)
        shard = train[pi::pc]
        if len(shard) == 0:
            raise DataError(
                f"config.data.sources.{name}: {len(train)} training document(s) "
                f"(after config.data.eval_fraction={frac}) for {pc} processes"
            )
        docs = grain.MapDataset.source(Subset(source, shard))
        docs = docs.shuffle(seed=_seed(config.seed, name, pi)).repeat(None)
        streams[name] = _stream(name, docs, len(shard), tokenizer, config.seq_len + 1, workers)
    return MixtureIterator(streams, phases, batch)


def make_eval_iterator(
    config,
    *,
    step: int = 0,
    num_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> MixtureIterator:
    """`num_batches` (default config.eval_batches) held-out batches, the same on every call."""
    pi, pc, batch, phases, tokenizer, frac = _setup(config, process_index, process_count)
    weights = phases[bisect.bisect_right([f for f, _ in phases], step) - 1][1]
    streams = {}
    for name in sorted(weights):
        source = _cached_source(name, config.data.sources[name], config.data.text_key)
        _, held = split_documents(len(source), frac)
        if len(held) == 0:
            raise DataError(
                f"config.data.eval_fraction={frac}: no held-out documents in "
                f"config.data.sources.{name} to evaluate on"
            )
        shard = held[pi::pc] if len(held) >= pc else held
        docs = grain.MapDataset.source(Subset(source, shard)).repeat(None)
        streams[name] = _stream(name, docs, len(shard), tokenizer, config.seq_len + 1, 0)
    n = config.eval_batches if num_batches is None else num_batches
    return MixtureIterator(streams, [(0, weights)], batch, num_batches=n)
