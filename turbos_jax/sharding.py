"""Logical axis names and the one place sharding metadata is written and read.

Every parameter is created through `param(...)`, which records the *logical* name of each of its
dimensions; every key activation passes through `constrain(...)`. Logical names are mapped onto mesh
axes by two ordered rule tables, one for parameters and one for activations, so a layer never names
a mesh axis itself.

Logical names (eight; `None` marks an unsharded dimension):

| name       | dimension it labels                                   | params -> | activations -> |
|------------|-------------------------------------------------------|-----------|----------------|
| `batch`    | batch rows                                            | -         | data, expert   |
| `seq`      | sequence positions                                    | -         | context        |
| `embed`    | the residual stream (d_model)                         | data,     | -              |
|            |                                                       | context   |                |
| `heads`    | attention query heads, Mamba2 heads                   | model     | model          |
| `kv_heads` | attention KV heads, Mamba2 SSM groups (B/C are shared | model     | model          |
|            | by the heads of a group as K/V are in GQA)            |           |                |
| `mlp`      | FFN and expert intermediate size                      | model     | model          |
| `vocab`    | vocabulary                                            | model     | model          |
| `expert`   | routed experts                                        | expert    | expert         |

Parameters shard `embed` over `data` and `context`: that is FSDP (ZeRO-3), gathered per layer inside
the scan; with context parallelism on, `context` is a second FSDP axis, so turning it on does not
replicate parameters or optimizer state (docs/sharding.md, "Context parallelism").
Stacked layers (the scanned period) carry one extra leading dimension that is never sharded; the
specs below add it by comparing the value's rank with the number of recorded names.

Mesh axes are `data`, `expert`, `model` and `context`, in that order; `make_mesh(config.mesh)` builds
the mesh from the config's sizes and checks them against the device count and the model config
(see docs/sharding.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import PartitionSpec

from turbos_jax.config import ConfigError

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "mlp", "vocab", "expert")
MESH_AXES = ("data", "expert", "model", "context")

# Ordered (logical name -> mesh axes) rules. Earlier rules claim mesh axes first and a mesh axis is
# used at most once per array, so e.g. a (batch, expert, ...) activation puts `expert` on its expert
# dimension and only `data` on its batch dimension.
PARAM_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expert", ("expert",)),
    ("vocab", ("model",)),
    ("heads", ("model",)),
    ("kv_heads", ("model",)),
    ("mlp", ("model",)),
    ("embed", ("data", "context")),
)
ACTIVATION_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expert", ("expert",)),
    ("batch", ("data", "expert")),
    ("seq", ("context",)),
    ("vocab", ("model",)),
    ("heads", ("model",)),
    ("kv_heads", ("model",)),
    ("mlp", ("model",)),
)

_METADATA_KEY = "logical_axes"
Names = Sequence[str | None]


def _check_names(names: Names) -> tuple[str | None, ...]:
    for n in names:
        if n is not None and n not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {n!r}; known: {LOGICAL_AXES}")
    return tuple(names)


def param(
    init: Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array],
    key: jax.Array,
    shape: Sequence[int],
    names: Names,
    dtype: jnp.dtype,
) -> nnx.Param:
    """Creates a parameter `init(key, shape, dtype)` labelled with one logical name per dimension."""
    shape = tuple(int(s) for s in shape)
    if len(names) != len(shape):
        raise ValueError(f"param of shape {shape} needs {len(shape)} logical names, got {names}")
    return nnx.Param(init(key, shape, dtype), **{_METADATA_KEY: _check_names(names)})


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical names a parameter was created with, one per (unstacked) dimension."""
    return tuple(variable.get_metadata().get(_METADATA_KEY, ()))


def _resolve(names: Names, rules) -> PartitionSpec:
    out: list = [None] * len(names)
    used: set[str] = set()
    for logical, mesh_axes in rules:
        for i, n in enumerate(names):
            if n == logical and out[i] is None:
                axes = tuple(a for a in mesh_axes if a not in used)
                if axes:
                    used.update(axes)
                    out[i] = axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*out)


def spec_for(variable: nnx.Variable, rules=PARAM_RULES) -> PartitionSpec:
    """PartitionSpec of one parameter; leading stacked-layer dimensions stay unsharded."""
    names = logical_names(variable)
    ndim = len(variable.get_value().shape)
    if ndim < len(names):
        raise ValueError(f"parameter of rank {ndim} has {len(names)} logical names {names}")
    return _resolve((None,) * (ndim - len(names)) + tuple(names), rules)


def param_specs(state: nnx.State, rules=PARAM_RULES):
    """Maps a (possibly abstract) state to a matching tree of PartitionSpecs."""
    return jax.tree.map(
        lambda v: spec_for(v, rules) if isinstance(v, nnx.Variable) else PartitionSpec(),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def named_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=PARAM_RULES):
    """NamedShardings for a (possibly abstract) state on `mesh`; mesh axes it lacks are dropped."""
    present = set(mesh.axis_names)
    return jax.tree.map(
        lambda spec: jax.sharding.NamedSharding(mesh, PartitionSpec(*[_keep_axes(e, present) for e in spec])),
        param_specs(state, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def sharded_abstract(abstract, mesh: jax.sharding.Mesh, rules=PARAM_RULES):
    """An abstract tree (ShapeDtypeStructs, possibly inside Variables) with shardings attached:
    the restore target for Orbax and the template for `jit(..., out_shardings=...)`."""
    with_sharding = lambda sh, sub: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), sub
    )
    return jax.tree.map(
        with_sharding,
        named_shardings(abstract, mesh, rules),
        abstract,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )


def activation_spec(names: Names) -> PartitionSpec:
    return _resolve(_check_names(names), ACTIVATION_RULES)


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Sharding constraint on an activation; a no-op when no mesh is in context."""
    if len(names) != x.ndim:
        raise ValueError(f"activation of shape {x.shape} needs {x.ndim} logical names, got {names}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = activation_spec(names)
    present = set(mesh.axis_names)
    spec = PartitionSpec(*[_keep_axes(s, present) for s in spec])
    return jax.lax.with_sharding_constraint(x, spec)


BATCH_NAMES = ("batch", "seq")  # the (B, L) arrays of a training batch: rows and sequence


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The sharding of a (B, L) training batch: rows over (data, expert), positions over context."""
    present = set(mesh.axis_names)
    spec = activation_spec(BATCH_NAMES)
    return jax.sharding.NamedSharding(mesh, PartitionSpec(*[_keep_axes(s, present) for s in spec]))


def process_batch_shard(batch_sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
    """(index, count) of the rows of the global batch this process's devices hold: rows
    [index * batch_size / count, (index + 1) * batch_size / count).

    Processes are not batch shards: when the `model` axis spans hosts, several processes hold the
    same rows (replicas along `model`) and must load the same data, so the input pipeline shards by
    this index, not by `jax.process_index()`. One process per shard is the usual case.
    """
    if isinstance(batch_sharding, jax.sharding.NamedSharding) and len(batch_sharding.spec) > 1:
        # Only the row split matters here; the sequence split (context) stays inside a process.
        batch_sharding = jax.sharding.NamedSharding(
            batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0])
        )
    rows = {
        (s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
        for s in batch_sharding.addressable_devices_indices_map((batch_size,)).values()
    }
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    size = hi - lo
    if sum(b - a for a, b in rows) != size or batch_size % size or lo % size:
        raise ConfigError(
            f"config.mesh: this process's devices hold batch rows {sorted(rows)}, not "
            f"one contiguous 1/n of the {batch_size} rows; reorder the mesh axes"
        )
    return lo // size, batch_size // size


def global_array(value, sharding_: jax.sharding.Sharding) -> jax.Array:
    """A host value held identically by every process -> the global array laid out by `sharding_`:
    each process places the slices its own devices hold (nothing crosses processes). For values
    every process computes alike (RL rollout batches); data loaded per process uses
    `jax.make_array_from_process_local_data` instead."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def host_value(x) -> np.ndarray:
    """The whole value of `x` (an array, or already numpy) on this host as numpy, also when it spans
    several processes' devices (then gathered from all of them: every process must call this at
    the same point)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def manual_over_mesh(fn: Callable, in_names: Sequence, out_names) -> Callable:
    """`fn` under `jax.shard_map` over the mesh in context, each argument and output sharded by its
    logical names (a tuple of names per array, None for an argument that is None); `fn` itself
    when no mesh is in context. For Pallas kernels, which GSPMD cannot partition: inside, `fn`
    sees its shard (e.g. its batch rows and heads) and must need no communication."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return fn
    present = set(mesh.axis_names)

    def spec(names):
        if names is None:
            return None
        return PartitionSpec(*[_keep_axes(s, present) for s in activation_spec(names)])

    is_names = lambda n: n is None or (isinstance(n, tuple) and all(isinstance(a, str | None) for a in n))
    in_specs = tuple(spec(n) for n in in_names)
    out_specs = jax.tree.map(spec, out_names, is_leaf=is_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _keep_axes(entry, present):
    if entry is None:
        return None
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a in present)
    return None if not axes else axes[0] if len(axes) == 1 else axes


# ------------------------------------------------------------------------------------------ mesh
def mesh_shape(mesh_cfg: Mapping, num_devices: int) -> dict[str, int]:
    """Resolves `config.mesh` ({data, expert, model, context}, one size may be -1) to axis sizes.

    Raises a one-line ConfigError naming the key for a missing or unknown key, a size that is not a
    positive integer (or -1), more than one -1, or a product != `num_devices`.
    """
    cfg = dict(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg)
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"config.mesh.{unknown[0]}: unknown key (known: {list(MESH_AXES)})")
    for axis in MESH_AXES:
        if axis not in cfg:
            raise ConfigError(f"config.mesh.{axis}: required key is missing")
        v = cfg[axis]
        if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
            raise ConfigError(
                f"config.mesh.{axis}={v!r}: must be a positive integer or -1 (-1 = the remaining devices)"
            )
    fill = [a for a in MESH_AXES if cfg[a] == -1]
    if len(fill) > 1:
        raise ConfigError(
            f"config.mesh.{fill[1]}=-1: at most one axis may be -1 (config.mesh.{fill[0]} is -1 already)"
        )
    fixed = math.prod(cfg[a] for a in MESH_AXES if cfg[a] != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh.{fill[0]}=-1: the other axes multiply to {fixed}, "
                f"which does not divide the {num_devices} devices"
            )
        cfg[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        sizes = " x ".join(f"{a}={cfg[a]}" for a in MESH_AXES)
        raise ConfigError(
            f"config.mesh.data={cfg['data']!r}: mesh {sizes} = {fixed} devices, "
            f"but {num_devices} are present (set one axis to -1 to fill)"
        )
    return {a: cfg[a] for a in MESH_AXES}


def check_mesh(
    shape: Mapping[str, int],
    model_cfg=None,
    batch_size: int | None = None,
    grad_accum_steps: int = 1,
    seq_len: int | None = None,
) -> None:
    """Divisibility of the model and batch by the mesh axes that shard them; one-line ConfigErrors.

    Every sharded dimension must divide evenly (there is no silent fallback to replication):
    heads, KV heads, Mamba2 heads and groups (unless one), the expert, shared-expert, dense-FFN and
    (padded) vocabulary sizes by `model`; experts by `expert`; d_model (FSDP) by `data * context`;
    each microbatch (batch_size / grad_accum_steps) by `data * expert`; seq_len by `context`, with
    each sequence shard at least the Mamba2 conv halo (mamba_conv - 1 tokens, which come from the
    previous shard).
    """
    if model_cfg is not None:
        # Only the layer kinds the layout has (an imported pure-Mamba2 model has no experts).
        layout = model_cfg.layout
        model_keys = ["vocab_size"]
        if "A" in layout:
            model_keys += ["num_heads", "num_kv_heads"]
        if "M" in layout:
            model_keys.append("mamba_heads")
            if model_cfg.mamba_groups > 1:  # a single group is replicated (layers/mamba2.py)
                model_keys.append("mamba_groups")
        if "F" in layout:
            model_keys.append("expert_dim")
            if model_cfg.shared_expert_dim:
                model_keys.append("shared_expert_dim")
        if "D" in layout:
            model_keys.append("mlp_dim")
        expert_keys = ("num_experts",) if "F" in layout else ()
        checks = (("model", model_keys), ("expert", expert_keys))
        for axis, keys in checks:
            for key in keys:
                # The vocabulary is padded to a multiple of config.model.vocab_multiple.
                v = model_cfg.padded_vocab if key == "vocab_size" else getattr(model_cfg, key)
                if v % shape[axis]:
                    hint = " (padded by vocab_multiple)" if key == "vocab_size" else ""
                    raise ConfigError(
                        f"config.model.{key}={getattr(model_cfg, key)!r}{hint}: must be divisible by "
                        f"config.mesh.{axis}={shape[axis]}"
                    )
        fsdp = shape["data"] * shape["context"]
        if model_cfg.d_model % fsdp:
            raise ConfigError(
                f"config.model.d_model={model_cfg.d_model!r}: must be divisible by config.mesh.data x "
                f"context = {shape['data']} x {shape['context']} = {fsdp} (FSDP)"
            )
    if seq_len is not None and shape["context"] > 1:
        cp = shape["context"]
        if seq_len % cp:
            raise ConfigError(f"config.seq_len={seq_len!r}: must be divisible by config.mesh.context={cp}")
        halo = 0 if model_cfg is None else model_cfg.mamba_conv - 1
        if seq_len // cp < max(halo, 1):
            raise ConfigError(
                f"config.seq_len={seq_len!r}: each of the config.mesh.context={cp} sequence shards "
                f"needs >= mamba_conv - 1 = {halo} tokens"
            )
    if batch_size is not None:
        n = shape["data"] * shape["expert"]
        if batch_size % (n * grad_accum_steps):
            accum = f" x grad_accum_steps {grad_accum_steps}" if grad_accum_steps > 1 else ""
            raise ConfigError(
                f"config.batch_size={batch_size!r}: must be divisible by mesh data x "
                f"expert = {shape['data']} x {shape['expert']}{accum} = "
                f"{n * grad_accum_steps}"
            )


def make_mesh(
    mesh_cfg: Mapping,
    devices: Sequence[jax.Device] | None = None,
    *,
    model_cfg=None,
    batch_size: int | None = None,
    grad_accum_steps: int = 1,
    seq_len: int | None = None,
) -> jax.sharding.Mesh:
    """`jax.make_mesh` with Auto axes (data, expert, model, context) sized by `config.mesh`.

    `devices` defaults to all devices; `model_cfg` / `batch_size` / `seq_len`, when given, are
    checked with `check_mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    check_mesh(shape, model_cfg, batch_size, grad_accum_steps, seq_len)
    sizes, axis_types = tuple(shape[a] for a in MESH_AXES), (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A TPU torus maps each mesh axis onto whole physical axes; sizes such as data 4 x context 2
        # on an 8x8x8 slice need one physical axis split between two mesh axes.
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def train_mesh(config, model_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh a train config asks for: `make_mesh(config.mesh)` checked against the model,
    `config.batch_size`, `config.grad_accum_steps` and `config.seq_len` (the trainer, `aot` and the
    benchmarks)."""
    if "mesh" not in config:
        raise ConfigError("config.mesh: required key is missing (see configs/turbos.py)")
    return make_mesh(
        config.mesh,
        devices,
        model_cfg=model_cfg,
        batch_size=config.batch_size,
        grad_accum_steps=config.grad_accum_steps,
        seq_len=config.seq_len,
    )
