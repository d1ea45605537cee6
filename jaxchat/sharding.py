"""Sharding, declared once: the mesh, the logical-axis table, and the helpers that apply it.

Parameters are born with logical axis names (model.py: `out_sharding=("embed", "mlp")`, ...); RULES below is
the only place that says which mesh axis each name lands on. Default: FSDP — every weight split along its
model-width ("embed") axis over `fsdp`, the batch split over all devices, GSPMD (Auto axes) inserting the
all-gathers / reduce-scatters.
"""

import math
from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
RULES = {
    "batch": ("data", "fsdp"),  # data (and activations' batch dim) over every device
    "embed": "fsdp",  # FSDP: each weight is split along its model-width axis
    "vocab": None,
    "mlp": None,
    "heads": None,
    "kv_heads": None,
}


def make_mesh(shape=None, devices=None):
    """Mesh with axes ("data", "fsdp"); shape (data, fsdp), one entry may be −1; default (1, all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(shape or (1, -1))
    known = math.prod(s for s in shape if s != -1)
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh (data, fsdp) = {shape} does not cover the {len(devices)} devices")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def logical_to_spec(names):
    return P(*(RULES[n] if n is not None else None for n in names))


def variable_spec(v):
    """PartitionSpec of an nnx.Variable from its logical `out_sharding` names (replicated if it has none)."""
    names = v.get_metadata().get("out_sharding")
    return logical_to_spec(names) if names else P()


def constrain(x, names):
    """Sharding constraint on an activation by logical names; a no-op when no mesh is active."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def constrain_rows(x):
    """Dim 0 over the batch axes when it divides them (decode rows; a shared prefix's prompts), else replicated;
    a scalar as it is."""
    if not x.ndim:
        return x
    return constrain(x, ("batch" if x.shape[0] % batch_shards() == 0 else None,) + (None,) * (x.ndim - 1))


def batch_shards():
    """How many ways the batch axis is split under the active mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in RULES["batch"])


def constrain_state(tree):
    """Pin every Variable in an NNX state to its logical sharding (e.g. the new state inside a jitted step)."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    is_var = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, variable_spec(v)) if is_var(v) else v,
                        tree, is_leaf=is_var)


def state_shardings(tree, mesh):
    """NamedSharding for every Variable (or plain array) of an NNX state tree."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    to_sharding = lambda v: NamedSharding(mesh, variable_spec(v) if is_var(v) else P())
    return jax.tree.map(to_sharding, tree, is_leaf=is_var)


def create_sharded(fn, mesh):
    """Run `fn` (which builds NNX objects: a model, or (model, optimizer)) under jit with every Variable created
    directly in its shard: no device ever holds a full copy."""
    graphdef, abstract = nnx.split(nnx.eval_shape(fn))

    @partial(jax.jit, out_shardings=state_shardings(abstract, mesh))
    def init():
        return nnx.split(fn())[1]

    with jax.set_mesh(mesh):
        return nnx.merge(graphdef, init())


def batch_spec(ndim, batch_axis=0):
    names = [None] * ndim
    names[batch_axis] = "batch"
    return logical_to_spec(names)


def shard_batch(batch, mesh, batch_axis=0):
    """device_put every array of `batch` with its `batch_axis` split over ("data", "fsdp")."""
    put = lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec(np.ndim(x), batch_axis)))
    return jax.tree.map(put, batch)


def sharding_table(model, mesh=None):
    """Rows (parameter, shape, spec, bytes per device) for every nnx.Param, from the logical names (works on
    abstract models too), and the fraction of parameter bytes sharded over `fsdp`. Mesh: default the active one."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    rows, total, on_fsdp = [], 0, 0
    params = nnx.state(model, nnx.Param)
    for path, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        spec, shape = variable_spec(v), v.shape
        axes = [(a,) if isinstance(a, str) else (a or ()) for a in tuple(spec) + (None,) * (len(shape) - len(spec))]
        local = [-(-n // math.prod(sizes.get(a, 1) for a in ax)) for n, ax in zip(shape, axes)]
        nbytes = math.prod(shape) * np.dtype(v.dtype).itemsize
        total += nbytes
        on_fsdp += nbytes if any("fsdp" in ax for ax in axes) else 0
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        rows.append((name, tuple(shape), spec, math.prod(local) * np.dtype(v.dtype).itemsize))
    return rows, on_fsdp / max(total, 1)


def print_sharding_table(model, mesh=None):
    rows, fraction = sharding_table(model, mesh)
    width = max(len(r[0]) for r in rows)
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    print(f"mesh {dict(mesh.shape) if not mesh.empty else 'none (1 device)'}")
    print(f"{'parameter':<{width}}  {'shape':<16} {'spec':<28} {'bytes/device':>14}")
    for name, shape, spec, nbytes in rows:
        print(f"{name:<{width}}  {str(shape):<16} {str(spec):<28} {nbytes:>14,}")
    print(f"total {sum(r[3] for r in rows):,} bytes/device; {100 * fraction:.1f}% of parameter bytes sharded on fsdp")
