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
| `embed`    | the residual stream (d_model)                         | data      | -              |
| `heads`    | attention query heads, Mamba2 heads                   | model     | model          |
| `kv_heads` | attention KV heads, Mamba2 SSM groups (B/C are shared | model     | model          |
|            | by the heads of a group as K/V are in GQA)            |           |                |
| `mlp`      | FFN and expert intermediate size                      | model     | model          |
| `vocab`    | vocabulary                                            | model     | model          |
| `expert`   | routed experts                                        | expert    | expert         |

Parameters shard `embed` over `data`: that is FSDP (ZeRO-3), gathered per layer inside the scan.
Stacked layers (the scanned period) carry one extra leading dimension that is never sharded; the
specs below add it by comparing the value's rank with the number of recorded names.

Mesh axes are `data`, `expert`, `model` and `context`; the mesh itself is built by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

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
    ("embed", ("data",)),
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
        lambda spec: jax.sharding.NamedSharding(
            mesh, PartitionSpec(*[_keep_axes(e, present) for e in spec])),
        param_specs(state, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def sharded_abstract(abstract, mesh: jax.sharding.Mesh, rules=PARAM_RULES):
    """An abstract tree (ShapeDtypeStructs, possibly inside Variables) with shardings attached:
    the restore target for Orbax and the template for `jit(..., out_shardings=...)`."""
    with_sharding = lambda sh, sub: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), sub)
    return jax.tree.map(with_sharding, named_shardings(abstract, mesh, rules), abstract,
                        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


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


def _keep_axes(entry, present):
    if entry is None:
        return None
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a in present)
    return None if not axes else axes[0] if len(axes) == 1 else axes
