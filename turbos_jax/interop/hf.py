"""Hugging Face hybrid checkpoints in and out: `load(path) -> (config, model)`, `export(...)`.

Supported: GraniteMoeHybrid, NemotronH, HunYuanMoEV1 and Mamba2 checkpoints in safetensors
(`hf_config.py` maps the config, `hf_params.py` the tensors; docs/interop.md).

`load`:
  1. config.json -> a full train config (configs/turbos.py with the mapped `config.model`, fp32,
     dropless MoE, the checkpoint's tokenizer.json if it has one, the source config.json kept as
     `config.hf_config` for the way back).
  2. Every HF tensor is assigned to exactly one mapping rule and every model leaf to exactly one
     rule output; a tensor without a place, or a missing one, is a one-line error naming it.
  3. The model is built abstractly (`nnx.eval_shape`); each leaf is then assembled on the host from
     memory-mapped tensors (stacked over the scanned layers, cast to param_dtype) and placed
     straight onto its sharding with `jax.make_array_from_callback`, one leaf at a time, so host
     memory holds at most one leaf (plus one layer's slices).
`export` runs the same rules backwards, one HF layer at a time, into sharded safetensors and the
source config.json (bit-exact when the dtype is unchanged).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from turbos_jax import sharding
from turbos_jax.checkpointing import leaf_path
from turbos_jax.config import ModelConfig
from turbos_jax.interop.hf_config import (
    UnsupportedCheckpointError,
    family_of,
    hf_layer_symbols,
    model_values,
)
from turbos_jax.interop.hf_params import block_rules, ignored_key, top_rules
from turbos_jax.interop.safetensors_io import TensorReader, write_sharded

CONFIG_FILE = "config.json"
SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
FP32_TENSORS = ("e_score_correction_bias",)  # kept in fp32 by HF whatever the model dtype


def read_hf_config(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UnsupportedCheckpointError(f"{path}: no readable {CONFIG_FILE} ({e})") from None


def train_config(hf: dict, path: str | None = None):
    """A full train config (configs/turbos.py's run, optimizer and data keys) for an HF config."""
    from configs import turbos

    config = turbos.get_config()
    m = config.model
    for key, value in model_values(hf).items():
        m[key] = value
    m.capacity_factor = 0.0  # dropless routing, as every HF implementation
    m.dtype = m.param_dtype = m.kv_cache_dtype = "float32"
    config.mesh.data, config.mesh.expert, config.mesh.model = -1, 1, 1
    tokenizer = os.path.join(path, "tokenizer.json") if path else ""
    if tokenizer and os.path.exists(tokenizer):
        config.data.tokenizer = os.path.abspath(tokenizer)
    config.hf_config = json.dumps(hf)  # the source config.json, for export
    return config


def _locate(cfg: ModelConfig, position: int) -> tuple[str, int | None]:
    """Layout position -> (block path prefix, stacked index or None)."""
    split = cfg.layout_split
    body = len(split.period) * split.repeats
    if position < len(split.prefix):
        return f"prefix/{position}/", None
    if position < len(split.prefix) + body:
        r, j = divmod(position - len(split.prefix), len(split.period))
        return f"period/{j}/", r
    return f"suffix/{position - len(split.prefix) - body}/", None


def _num_hf_layers(family: str, cfg: ModelConfig) -> int:
    return len(cfg.layout) // len(hf_layer_symbols(family, 0))


def _placed_rules(family: str, cfg: ModelConfig):
    """[(rule, leaf paths, stacked index or None)] for the whole model."""
    placed = [(rule, rule.leaves, None) for rule in top_rules(family, cfg)]
    for layer in range(_num_hf_layers(family, cfg)):
        for q, position in enumerate(hf_layer_symbols(family, layer)):
            prefix, r = _locate(cfg, position)
            for rule in block_rules(family, cfg, layer, cfg.layout[position], q):
                placed.append((rule, tuple(prefix + leaf for leaf in rule.leaves), r))
    return placed


def _check_keys(placed, reader: TensorReader, family: str) -> None:
    wanted = [key for rule, _, _ in placed for key in rule.keys]
    missing = [key for key in wanted if key not in reader]
    if missing:
        raise UnsupportedCheckpointError(f"tensor {missing[0]} is missing from the checkpoint")
    extra = sorted(set(reader.keys()) - set(wanted))
    extra = [key for key in extra if not ignored_key(family, key)]
    if extra:
        raise UnsupportedCheckpointError(
            f"tensor {extra[0]} {reader.shape(extra[0])} has no turbos-jax counterpart "
            f"({len(extra)} such tensor(s)); the checkpoint uses a feature turbos-jax lacks"
        )


def _host_leaf(sources, reader: TensorReader, shape: tuple[int, ...], dtype) -> np.ndarray:
    """One leaf of `shape` from its [(rule, output index, stacked index)] sources, written in place
    (a scanned leaf is filled one layer at a time: no second copy of the stack)."""
    out = np.empty(shape, dtype)
    stacked = sources[0][2] is not None
    if (len(sources) != shape[0]) if stacked else (len(sources) != 1):
        raise UnsupportedCheckpointError(f"internal: {len(sources)} sources for a leaf of shape {shape}")
    for rule, index, r in sources:
        try:
            value = rule.to_jax(*[reader.read(k) for k in rule.keys])[index]
            if stacked:
                out[r] = value
            else:
                out[...] = value
        except ValueError as e:
            shapes = ", ".join(f"{k} {reader.shape(k)}" for k in rule.keys)
            raise UnsupportedCheckpointError(f"tensor(s) {shapes}: do not fit {shape} ({e})") from None
    return out


def load(path: str, mesh: jax.sharding.Mesh | None = None, config=None):
    """-> (train config, TurbosModel) from an HF checkpoint directory, its parameters placed on
    `mesh` (None: the default device). `config` (optional) replaces the derived train config
    (its model keys must describe this checkpoint, e.g. the derived config with dtype changes)."""
    from turbos_jax.model import TurbosModel

    hf = read_hf_config(path)
    family = family_of(hf)
    config = train_config(hf, path) if config is None else config
    cfg = ModelConfig.from_config(config.model)
    reader = TensorReader(path)
    placed = _placed_rules(family, cfg)
    _check_keys(placed, reader, family)
    sources = defaultdict(list)
    for rule, leaves, r in placed:
        for index, leaf in enumerate(leaves):
            sources[leaf].append((rule, index, r))

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TurbosModel(cfg, rngs=nnx.Rngs(0))))
    target = abstract if mesh is None else sharding.sharded_abstract(abstract, mesh)

    def place(path_keys, sds):
        name = leaf_path(path_keys)
        if name not in sources:
            raise UnsupportedCheckpointError(
                f"model parameter {name} {sds.shape} has no tensor in the checkpoint"
            )
        host = _host_leaf(sources.pop(name), reader, sds.shape, sds.dtype)
        if mesh is None:
            return jax.device_put(host)
        return jax.make_array_from_callback(sds.shape, sds.sharding, lambda index: host[index])

    state = jax.tree_util.tree_map_with_path(place, target)
    if sources:
        raise UnsupportedCheckpointError(
            f"internal: mapped leaf {sorted(sources)[0]} is not a model parameter"
        )
    return config, nnx.merge(graphdef, state)


def _check_same_architecture(config, hf: dict) -> None:
    """The model keys export writes back must be those of the source config.json."""
    for key, value in model_values(hf).items():
        have = config.model[key]
        have = tuple(have) if isinstance(have, list | tuple) else have
        value = tuple(value) if isinstance(value, list | tuple) else value
        if have != value and not (isinstance(value, float) and np.isclose(have, value, rtol=1e-12)):
            raise UnsupportedCheckpointError(
                f"config.model.{key}={have!r}: the source checkpoint's config.json gives {value!r}; "
                "export writes the source architecture only"
            )


def export(config, model_or_params, out_dir: str, dtype: str | None = None, max_shard_bytes: int = 5 << 30):
    """Writes `out_dir`/config.json + model-*-of-*.safetensors + index for an imported model.

    `model_or_params`: a TurbosModel or its nnx.State. `dtype` ("float32", "bfloat16",
    "float16"; None = the source config.json's `dtype`, else float32). Gathers one HF layer at a
    time to the host. Returns the list of files written."""
    if "hf_config" not in config:
        raise UnsupportedCheckpointError(
            "config.hf_config: missing; export needs the source config.json a converted config carries"
        )
    hf = json.loads(config.hf_config)
    family = family_of(hf)
    _check_same_architecture(config, hf)
    cfg = ModelConfig.from_config(config.model)
    dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in SAVE_DTYPES:
        raise UnsupportedCheckpointError(f"dtype={dtype!r}: expected one of {list(SAVE_DTYPES)}")
    state = model_or_params if isinstance(model_or_params, nnx.State) else nnx.state(model_or_params)
    leaves = {leaf_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(state)}

    def host(path: str, r: int | None) -> np.ndarray:
        value = leaves[path] if r is None else leaves[path][r]
        return np.asarray(jax.device_get(value), np.float32)

    def tensors():
        for rule, paths, r in _placed_rules(family, cfg):
            for key, arr in zip(rule.keys, rule.to_hf(*[host(p, r) for p in paths]), strict=True):
                keep_fp32 = any(key.endswith(name) for name in FP32_TENSORS)
                yield key, np.ascontiguousarray(arr, np.float32 if keep_fp32 else SAVE_DTYPES[dtype])

    files = write_sharded(tensors(), out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf | {"dtype": dtype}, f, indent=2)
    return files + [CONFIG_FILE]
