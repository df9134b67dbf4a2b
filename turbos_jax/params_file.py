"""A model's parameters in one safetensors file, with the train config that made them.

    python -m turbos_jax.convert --workdir=W --to_params=model.safetensors   # write (docs/interop.md)
    --config.init_from=model.safetensors   (train / sft / rl)                 # start from it
    python -m turbos_jax.generate --workdir=model.safetensors ...             # sample from it

A checkpoint directory holds the optimizer's moments and the data position too (three times the
parameters' bytes, in Orbax's many files); this file holds only what a new run starts from, so a
small model can ship inside the package (`turbos_jax/posttrain/shipped/`).

Layout: one tensor per parameter leaf, named by its tree path (`blocks/attn/0/mixer/q_proj/kernel`,
`checkpointing.leaf_path`), stored in the parameter's own dtype; the header's `__metadata__` holds
`format` (FORMAT), `step` (the checkpoint step the parameters came from) and `config` (the source
run's train config as JSON). Loading compares names, shapes and dtypes with the parameters the
current config builds before any array is read: a difference is one `ParamsFileError` line naming
the first differing parameter and the `config.model.*` key behind it (`workdir.config_hint`, fed
the file's config).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from turbos_jax import checkpointing, cli
from turbos_jax import workdir as run_dir
from turbos_jax.interop import safetensors_io

FORMAT = "turbos-jax-params/1"
SUFFIX = ".safetensors"


class ParamsFileError(cli.UserError):
    """A parameters file is unreadable, not in FORMAT, or does not match the config's model."""


def is_params_file(path: str) -> bool:
    """True when `path` names a parameters file rather than a run directory (by its suffix)."""
    return str(path).endswith(SUFFIX)


def save(path: str, params: Any, config, step: int) -> int:
    """Writes `params` (a tree of arrays, fully addressable from this process) with `config` (the
    ConfigDict that trained them) and `step`; returns the number of parameters. The file appears
    whole or not at all (written next to `path`, then renamed)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    tensors = [(checkpointing.leaf_path(p), np.asarray(jax.device_get(x))) for p, x in leaves]
    metadata = {"format": FORMAT, "step": str(int(step)), "config": config.to_json_best_effort()}
    safetensors_io.write_file(path, tensors, metadata)
    return sum(t.size for _, t in tensors)


def read_step(path: str) -> int:
    """The checkpoint step the file's parameters were written from."""
    return int(_metadata(path)["step"])


def load(path: str, abstract_params: Any, config=None) -> Any:
    """The file's parameters as a tree shaped like `abstract_params` (ShapeDtypeStructs, each
    placed on its `.sharding`; with several processes each reads only its own shards), after the
    check of the module docstring; `config` (the train config that built `abstract_params`, if
    known) lets the mismatch error name the `config.model` key."""
    metadata = _metadata(path)
    reader = safetensors_io.TensorReader(path)
    saved = {key: checkpointing.describe(reader.read(key)) for key in reader.keys()}
    wanted = {
        checkpointing.leaf_path(p): checkpointing.describe(a)
        for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
    explain = None
    if config is not None:
        explain = run_dir.config_hint(json.loads(metadata["config"]), config, where="the file's config")
    mismatch = checkpointing.first_mismatch(saved, wanted, explain, what="the file")
    if mismatch:
        raise ParamsFileError(f"{path}: does not match this config: {mismatch}")

    def place(key_path, leaf):
        stored = reader.read(checkpointing.leaf_path(key_path))
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: np.array(stored[index]))

    return jax.tree_util.tree_map_with_path(place, abstract_params)


def init_params(source: str, abstract_state: Any, config) -> tuple[int, Any]:
    """(step, parameters) that `config.init_from`-style `source` starts a run with: a parameters
    file, or the newest readable checkpoint of a workdir (`checkpointing.restore_for_init`, the
    optimizer state left unread). `abstract_state["params"]` gives shapes and placement."""
    if is_params_file(source):
        return read_step(source), load(source, abstract_state["params"], config)
    hint = run_dir.config_hint(run_dir.saved_config(source), config)
    step, restored = checkpointing.restore_for_init(
        os.path.join(source, "checkpoints"), abstract_state, params_only=True, explain=hint
    )
    return step, restored["params"]


def _metadata(path: str) -> dict:
    if not os.path.isfile(path):
        raise ParamsFileError(f"{path}: no such parameters file")
    try:
        metadata = safetensors_io.read_metadata(path)
    except safetensors_io.SafetensorsError as e:
        raise ParamsFileError(str(e)) from None
    if metadata.get("format") != FORMAT or "config" not in metadata or "step" not in metadata:
        raise ParamsFileError(
            f"{path}: not a turbos-jax parameters file (metadata format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}; write one with python -m turbos_jax.convert --to_params)"
        )
    return metadata
