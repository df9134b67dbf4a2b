"""SFT data: JSONL prompt/response records (or chat turns) -> token ids with a response mask -> packed
batches with the trainer's keys (`packing.BATCH_KEYS`).

Records (one JSON object per line; the keys are `config.sft.*_key`):
  {"prompt": str, "response": str}                              a user turn, then an assistant turn
  {"messages": [{"role": "user", "content": str}, ...]}         any turns, roles system/user/assistant
Eval records may also carry {"answer": str}, the reference for exact match (else the final answer
extracted from the last response by `posttrain.answers.extract_answer`).

Rendering (tokenizer-agnostic, `render`):
  1. Each turn is `config.sft.role_prefixes[role] + content`, tokenised on its own, turns concatenated
     with nothing between them (the prefixes are the template; "" for all roles gives the bare
     `prompt + response` the arithmetic task is written for).
  2. Every assistant turn is followed by the stop token: `config.sft.stop_text` as a single token
     (the byte tokenizer has no EOS, so "\n" ends a response there), or the tokenizer's EOS when
     stop_text is "". Generation stops at the same token.
  3. Loss only where the *target* is an assistant token or its stop token: the model learns to
     answer and to stop, never to write prompts.
An example of n tokens becomes inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:] (n - 1
positions), so examples packed next to each other never predict across their boundary.

Packing: grain's first-fit packer (`FirstFitPackIterDataset`) places whole examples into rows of
`seq_len` tokens with `segment_ids` 1, 2, ... and positions restarting per example; an example is
never split (it would lose its prompt), the rest of a row is padding (segment 0, no loss).

Every record is read and checked when the iterator is built (SFT sets are small next to pre-training
corpora), so bad data stops the run before training with one `DataError` line naming the file and
line: not JSON, a missing or non-string key, an empty response, a bad role, or an example longer than
`seq_len + 1` tokens. Process p of P trains on records p, p + P, ...; order is a seeded shuffle per
epoch; the iterator state goes into every checkpoint (resume is exact).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, NamedTuple

import grain
import numpy as np

from turbos_jax.data.pipeline import local_batch_size, process_index_and_count
from turbos_jax.data.sources import DataError
from turbos_jax.data.tokenizers import check_vocab, load_tokenizer

ROLES = ("system", "user", "assistant")


class Example(NamedTuple):
    """One rendered record: token ids (n,) int32, loss weight per token (n,) float32 (1 on assistant
    tokens and their stop token), the rendered prompt (everything before the last assistant turn,
    with its prefix) for generation, and the reference answer (None: none known)."""

    ids: np.ndarray
    weights: np.ndarray
    prompt_ids: np.ndarray
    reference: str | None
    where: str  # "file:line", for messages


class SftFormat(NamedTuple):
    """How records become tokens (from config.sft and config.data.tokenizer)."""

    tokenizer: Any
    stop_id: int
    prompt_key: str
    response_key: str
    messages_key: str
    answer_key: str
    role_prefixes: dict


def make_format(config) -> SftFormat:
    """Checks config.sft's rendering keys and loads the tokenizer; one-line DataError otherwise."""
    s = config.sft
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_vocab(tokenizer, config.model.vocab_size)
    if s.stop_text:
        ids = tokenizer.encode(s.stop_text)
        if len(ids) != 1:
            raise DataError(f"config.sft.stop_text={s.stop_text!r}: must be one token, is {len(ids)}")
        stop_id = ids[0]
    elif tokenizer.eos_id is None:
        raise DataError(f"config.sft.stop_text='': config.data.tokenizer={tokenizer.name!r} has no EOS token")
    else:
        stop_id = tokenizer.eos_id
    prefixes = dict(s.role_prefixes)
    if sorted(prefixes) != sorted(ROLES):
        raise DataError(
            f"config.sft.role_prefixes: expected exactly the roles {ROLES}, got {sorted(prefixes)}"
        )
    return SftFormat(
        tokenizer, int(stop_id), s.prompt_key, s.response_key, s.messages_key, s.answer_key, prefixes
    )


def _turns(record, fmt: SftFormat, where: str) -> list[tuple[str, str]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object")
    if fmt.messages_key in record:
        messages = record[fmt.messages_key]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: {fmt.messages_key!r} must be a non-empty list of turns")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: {fmt.messages_key}[{i}] must be {{'role': one of {ROLES}, 'content': str}}"
                )
            turns.append((m["role"], m["content"]))
    else:
        for key in (fmt.prompt_key, fmt.response_key):
            if not isinstance(record.get(key), str):
                raise DataError(
                    f"{where}: no string field {key!r} (records need {fmt.prompt_key!r} and "
                    f"{fmt.response_key!r}, or {fmt.messages_key!r})"
                )
        turns = [("user", record[fmt.prompt_key]), ("assistant", record[fmt.response_key])]
    answers = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    if not answers:
        raise DataError(f"{where}: no assistant turn to train on")
    for i in answers:
        if not turns[i][1].strip():
            raise DataError(f"{where}: empty response")
    return turns


def encode_turns(turns, fmt: SftFormat, *, open_last: bool = False) -> tuple[list[int], list[float], int]:
    """Steps 1-3 of the module docstring for (role, content) turns -> (ids, loss weights, the index
    where the last assistant turn's content starts). `open_last`: no stop token after the last turn
    (a prompt the model is to continue)."""
    ids, weights, last_start = [], [], 0
    for i, (role, content) in enumerate(turns):
        prefix = fmt.tokenizer.encode(fmt.role_prefixes[role]) if fmt.role_prefixes[role] else []
        body = fmt.tokenizer.encode(content) if content else []
        ids += prefix
        weights += [0.0] * len(prefix)
        if role == "assistant":
            last_start = len(ids)
        ids += body
        weights += [float(role == "assistant")] * len(body)
        if role == "assistant" and not (open_last and i == len(turns) - 1):
            ids.append(fmt.stop_id)
            weights.append(1.0)
    return ids, weights, last_start


def render(record, fmt: SftFormat, where: str = "record") -> Example:
    """A record -> Example (module docstring, steps 1-3)."""
    from turbos_jax.posttrain.answers import extract_answer

    turns = _turns(record, fmt, where)
    ids, weights, prompt_end = encode_turns(turns, fmt)
    reference = record.get(fmt.answer_key)
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: {fmt.answer_key!r} must be a string")
    if reference is None:
        last_answer = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
        reference = extract_answer(turns[last_answer][1])
    ids_arr = np.asarray(ids, np.int32)
    return Example(ids_arr, np.asarray(weights, np.float32), ids_arr[:prompt_end], reference, where)


def read_examples(pattern: str, fmt: SftFormat, *, key: str, max_len: int | None = None) -> list[Example]:
    """Every record of the JSONL file(s) `pattern` (sorted glob) rendered; `key` names the config key
    in errors; `max_len`: the longest example allowed, in tokens."""
    path = os.path.expanduser(str(pattern))
    paths = [path] if os.path.isfile(path) else sorted(p for p in glob.glob(path) if os.path.isfile(p))
    if not paths:
        raise DataError(f"config.sft.{key}={pattern!r}: no files match")
    examples = []
    for p in paths:
        with open(p, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"config.sft.{key}: {p}:{number}"
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"{where}: not valid JSON ({type(e).__name__})") from None
                example = render(record, fmt, where)
                if max_len is not None and len(example.ids) > max_len:
                    raise DataError(
                        f"{where}: {len(example.ids)} tokens with the stop token, longer than "
                        f"config.seq_len + 1 = {max_len}"
                    )
                examples.append(example)
    if not examples:
        raise DataError(f"config.sft.{key}={pattern!r}: no records")
    return examples


def _features(example: Example) -> dict[str, np.ndarray]:
    return {"inputs": example.ids[:-1], "targets": example.ids[1:], "loss_mask": example.weights[1:]}


class _ToBatch:
    """Packed, batched features -> the trainer's batch dict (picklable for grain)."""

    def __call__(self, packed: dict) -> dict[str, np.ndarray]:
        return {
            "inputs": packed["inputs"].astype(np.int32),
            "targets": packed["targets"].astype(np.int32),
            "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
            "positions": packed["inputs_positions"].astype(np.int32),
            "loss_mask": packed["loss_mask"].astype(np.float32),
        }


def _packed(ds: grain.IterDataset, config, batch: int) -> grain.IterDataset:
    lengths = dict.fromkeys(("inputs", "targets", "loss_mask"), config.seq_len)
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=batch, shuffle_bins=False
    )
    return packed.batch(batch, drop_remainder=False).map(_ToBatch())


def make_sft_train_iterator(config, examples: list[Example], *, process_index=None, process_count=None):
    """Endless, checkpointable iterator of this process's packed SFT batches (module docstring)."""
    pi, pc = process_index_and_count(process_index, process_count)
    batch = local_batch_size(config, pc)
    shard = examples[pi::pc]
    if not shard:
        raise DataError(f"config.sft.train_file: {len(examples)} record(s) for {pc} processes")
    ds = grain.MapDataset.source([_features(e) for e in shard]).shuffle(seed=config.seed + pi).repeat(None)
    return _packed(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)), config, batch
    ).__iter__()


def make_sft_eval_batches(config, examples: list[Example], *, process_index=None, process_count=None) -> list:
    """The held-out examples of this process, packed into at most config.eval_batches batches (the
    same every call)."""
    pi, pc = process_index_and_count(process_index, process_count)
    batch = local_batch_size(config, pc)
    shard = examples[pi::pc] or examples
    ds = grain.MapDataset.source([_features(e) for e in shard]).to_iter_dataset()
    out = []
    for b in _packed(ds, config, batch):
        if len(out) == config.eval_batches:
            break
        if len(b["inputs"]) < batch:  # the last, short batch: pad rows (segment 0, no loss)
            b = {
                k: np.concatenate([v, np.zeros((batch - len(v), *v.shape[1:]), v.dtype)])
                for k, v in b.items()
            }
        out.append(b)
    return out
