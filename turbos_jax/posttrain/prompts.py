"""RL prompt sources: JSONL files mixed by weight, with a checkpointable position.

    source = PromptStream({"math": records_a, "code": records_b}, seed=0)
    batch = source.draw(16, {"math": 2, "code": 1})    # list of records, each with "source"
    state = source.get_state()                         # bytes: saved with the checkpoint

A record is a dict with at least "prompt" and what its reward needs ("answer" for the answer
checker, "tests" for the code sandbox); `load_records` reads and checks a file, one line per record.
Each source is read in a shuffled order that is reshuffled at every pass; the draw picks each
prompt's source by the mixture weights. The position (every source's cursor and pass, and the
generator's state) is the iterator state the checkpoint holds (grain's `get_state` / `set_state`
protocol), so a resumed run draws exactly the prompts the uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

KINDS = ("answer", "code")  # how a record is scored: answer checker, or unit tests in the sandbox


class PromptError(ValueError):
    """A prompt file or record is missing, unreadable or lacks a key; the message names it."""


def load_records(path: str, *, prompt_key: str, answer_key: str, kind: str) -> list[dict]:
    """Reads a JSONL file -> [{"prompt", "answer" or "tests", "kind"}]; PromptError naming the file
    and line for bad JSON, a missing key, an empty prompt, or "tests" that is not a non-empty list
    of strings (a bare string would otherwise run each character as a test)."""
    if kind not in KINDS:
        raise PromptError(f"kind={kind!r} for {path}: expected one of {KINDS}")
    need = answer_key if kind == "answer" else "tests"
    if not os.path.isfile(path):
        raise PromptError(f"{path}: no such prompt file")
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PromptError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(prompt_key), str) or not row[prompt_key]:
                raise PromptError(f"{path}:{i}: expected an object with a non-empty string {prompt_key!r}")
            if need not in row:
                raise PromptError(f"{path}:{i}: missing {need!r} (needed by kind={kind!r})")
            if kind == "code" and not (
                isinstance(row[need], list) and row[need] and all(isinstance(t, str) for t in row[need])
            ):
                raise PromptError(f"{path}:{i}: {need!r} must be a non-empty list of snippet strings")
            if kind == "code":
                records.append({"prompt": row[prompt_key], "tests": list(row[need]), "kind": kind})
            else:
                records.append({"prompt": row[prompt_key], "answer": str(row[need]), "kind": kind})
    if not records:
        raise PromptError(f"{path}: no records")
    return records


def check_prompt_lengths(records: Sequence[dict], prompt_ids, max_prompt_len: int, where: str) -> None:
    """PromptError naming `where` and the first record whose prompt, rendered by `prompt_ids(text)
    -> ids`, has more than `max_prompt_len` tokens: checked before training, since a long prompt
    drawn mid-run would otherwise stop the run."""
    for i, record in enumerate(records):
        n = len(prompt_ids(record["prompt"]))
        if n > max_prompt_len:
            raise PromptError(
                f"{where}: record {i + 1} ({record['prompt'][:40]!r}) has {n} prompt tokens > "
                f"config.rl.max_prompt_len={max_prompt_len}"
            )


class PromptStream:
    """Weighted mixture of record lists with a resumable position (module docstring)."""

    def __init__(self, sources: Mapping[str, Sequence[dict]], seed: int):
        if not sources:
            raise PromptError("no prompt sources")
        self._sources = {name: list(recs) for name, recs in sources.items()}
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._cursor = dict.fromkeys(self._sources, 0)
        self._pass = dict.fromkeys(self._sources, 0)
        self._orders = {}  # name -> (pass, permutation): a function of (seed, source, pass)

    def _order(self, name: str) -> np.ndarray:
        if self._orders.get(name, (None,))[0] != self._pass[name]:
            key = [self._seed, self._pass[name], sorted(self._sources).index(name)]
            order = np.random.default_rng(key).permutation(len(self._sources[name]))
            self._orders[name] = (self._pass[name], order)
        return self._orders[name][1]

    def _next(self, name: str) -> dict:
        recs = self._sources[name]
        if self._cursor[name] >= len(recs):
            self._cursor[name], self._pass[name] = 0, self._pass[name] + 1
        record = recs[int(self._order(name)[self._cursor[name]])]
        self._cursor[name] += 1
        return {**record, "source": name}

    def draw(self, num: int, mixture: Mapping[str, float]) -> list[dict]:
        """`num` records; each one's source drawn with probability proportional to its weight."""
        names = [n for n, w in mixture.items() if w > 0]
        unknown = [n for n in names if n not in self._sources]
        if unknown or not names:
            have = sorted(self._sources)
            raise PromptError(f"mixture {dict(mixture)}: unknown or no sources (have {have})")
        p = np.array([mixture[n] for n in names], np.float64)
        picks = self._rng.choice(len(names), size=num, p=p / p.sum())
        return [self._next(names[int(i)]) for i in picks]

    # grain's iterator-state protocol (turbos_jax.checkpointing saves it next to the train state)
    def get_state(self) -> bytes:
        state = {"cursor": self._cursor, "pass": self._pass, "rng": self._rng.bit_generator.state}
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if sorted(state["cursor"]) != sorted(self._sources):
            saved, have = sorted(state["cursor"]), sorted(self._sources)
            raise PromptError(f"the checkpoint's prompt sources {saved} differ from the config's {have}")
        self._cursor, self._pass = state["cursor"], state["pass"]
        self._rng.bit_generator.state = state["rng"]

    def start_prefetch(self) -> None:  # called by grain's checkpoint handler after set_state
        pass
