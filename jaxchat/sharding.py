"""Sharding, declared once: the mesh, the logical-axis rules, and the helpers that apply them.

Parameters are born with logical axis names (model.py: `out_sharding=("embed", "mlp")`, ...) and carry RULES,
the only place that says which mesh axes each name lands on. Flax resolves the names with them: for any model or
optimizer state, `nnx.get_partition_spec` gives the mesh specs and `nnx.get_named_sharding` the shardings that
jaxchat places and pins the arrays with. Default: FSDP — every weight split along its model-width ("embed") axis
over `fsdp`, the batch split over all devices, GSPMD (Auto axes) inserting the all-gathers / reduce-scatters.
"""

import math

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, NamedSharding

AXES = ("data", "fsdp")
# (logical name, mesh axes) pairs: Flax's rule format. Every parameter holds them in its `sharding_rules` metadata
# rather than relying on an `nnx.logical_axis_rules` context, which is per thread and would have to be entered
# around every use; an enclosing context still composes with them, and Flax refuses one that disagrees.
# A tuple, not a dict: the metadata is part of the model's graph definition, which must be hashable.
RULES = (
    ("batch", ("data", "fsdp")),  # data (and activations' batch dim) over every device
    ("embed", "fsdp"),  # FSDP: each weight is split along its model-width axis
    ("vocab", None),
    ("mlp", None),
    ("heads", None),
    ("kv_heads", None),
)


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
    """Mesh spec of an array that is no Variable (an activation, a batch) from its logical names. Flax's metadata
    machinery only covers Variables, so this applies Flax's own renaming with RULES, the one
    `nnx.get_partition_spec` applies to parameters: both always agree."""
    return flax_spmd.get_pspec(tuple(names), RULES)


def constrain(x, names):
    """Sharding constraint on an activation by logical names; a no-op when no mesh is active."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def row_names(x):
    """Logical names of a decode-row array (rows; a shared prefix's prompts): dim 0 over the batch axes when it
    divides them, else replicated; a scalar has none."""
    if not x.ndim:
        return ()
    return ("batch" if x.shape[0] % batch_shards() == 0 else None,) + (None,) * (x.ndim - 1)


def constrain_rows(x):
    """Pin a decode-row array as `row_names` says."""
    return constrain(x, row_names(x)) if x.ndim else x


def platform():
    """"cpu", "gpu" or "tpu": the platform of the devices the program being traced is built for, i.e. the active
    mesh's. Kernel choices read this rather than the process's default backend, so that a program compiled ahead of
    time on this machine for a GPU or TPU mesh is the one that hardware would run. Without a mesh: the default."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def batch_shards():
    """How many ways the batch axis is split under the active mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in dict(RULES)["batch"])


def round_up_to_shards(rows, shards=None):
    """`rows` rounded up to a multiple of `shards` (default: `batch_shards()`), so every device gets as many rows."""
    shards = batch_shards() if shards is None else shards
    return -(-rows // shards) * shards


def constrain_state(tree):
    """Pin every Variable in an NNX state to the spec Flax resolves from its metadata (e.g. the new state inside a
    jitted step); one without logical names (a step count) replicated."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, nnx.get_partition_spec(tree))


def state_shardings(tree, mesh):
    """NamedSharding for every Variable (or plain array) of an NNX state tree, as Flax resolves it."""
    return nnx.get_named_sharding(tree, mesh)


def create_sharded(fn):
    """Run `fn` (which builds NNX objects: a model, or (model, optimizer)) with every Variable created directly in
    its shard of the mesh set by `jax.set_mesh`: no device ever holds a full copy. Without a mesh, just fn().

    Flax could shard each Variable as it is created (`eager_sharding`), but then refuses to create one without a
    mesh; jaxchat also builds models on one device with no mesh, so parameters are created plain and placed here
    by jit's output shardings, read from the same metadata."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
        return fn()
    graphdef, abstract = nnx.split(nnx.eval_shape(fn))
    init = jax.jit(lambda: nnx.split(fn())[1], out_shardings=state_shardings(abstract, mesh))
    return nnx.merge(graphdef, init())


def batch_spec(ndim, batch_axis=0):
    names = [None] * ndim
    names[batch_axis] = "batch"
    return logical_to_spec(names)


def shard_batch(batch, batch_axis=0, global_rows=None):
    """device_put every array of `batch` with its `batch_axis` split over the batch axes of the mesh set by
    `jax.set_mesh`; without one, onto the default device. `batch` is the whole batch, the same on every process;
    or, with `global_rows`, only this process's rows (`local_rows`) of a batch of that many rows."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
        return jax.device_put(batch)

    def put(x):
        where = NamedSharding(mesh, batch_spec(np.ndim(x), batch_axis))
        if global_rows is None and jax.process_count() > 1:  # each process copies only its devices' rows
            return jax.make_array_from_callback(np.shape(x), where, lambda index: x[index])
        if global_rows is None:
            return jax.device_put(x, where)
        shape = list(np.shape(x))
        shape[batch_axis] = global_rows
        return jax.make_array_from_process_local_data(where, x, tuple(shape))
    return jax.tree.map(put, batch)


def local_rows(global_rows):
    """range of the rows of a batch of `global_rows` that this process's devices hold under the active mesh (all
    of them with one process): the rows its loader must build."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty or jax.process_count() == 1:
        return range(global_rows)
    where = NamedSharding(mesh, batch_spec(1))
    starts = sorted({i[0].start or 0 for i in where.addressable_devices_indices_map((global_rows,)).values()})
    per = global_rows // batch_shards()
    if starts != list(range(starts[0], starts[0] + per * len(starts), per)):  # jax.make_mesh keeps a host's together
        raise ValueError(f"this process's devices hold rows starting at {starts}, not one contiguous block")
    return range(starts[0], starts[0] + per * len(starts))


def to_host(tree):
    """numpy copies of a tree of arrays, whole on every process: an array split over other processes' devices is
    gathered from them first (every process must call this together)."""
    if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False)
           for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def sharding_table(model, mesh=None):
    """Rows (parameter, shape, mesh spec, bytes per device, logical names) for every nnx.Param, the mesh spec as
    Flax resolves the logical names (abstract models too), and the fraction of parameter bytes sharded over
    `fsdp`. Mesh: default the active one."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    rows, total, on_fsdp = [], 0, 0
    params = nnx.state(model, nnx.Param)
    for path, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        spec, shape = nnx.get_partition_spec(v).get_value(), v.shape
        axes = [(a,) if isinstance(a, str) else (a or ()) for a in tuple(spec) + (None,) * (len(shape) - len(spec))]
        # Ceiling division: a dimension that does not divide its axes still gets a (padded) size.
        local = [-(-n // math.prod(sizes.get(a, 1) for a in ax)) for n, ax in zip(shape, axes)]
        nbytes = math.prod(shape) * np.dtype(v.dtype).itemsize
        total += nbytes
        on_fsdp += nbytes if any("fsdp" in ax for ax in axes) else 0
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        logical = tuple(v.get_metadata().get("out_sharding") or ())
        rows.append((name, tuple(shape), spec, math.prod(local) * np.dtype(v.dtype).itemsize, logical))
    return rows, on_fsdp / max(total, 1)


def print_sharding_table(model, mesh=None):
    rows, fraction = sharding_table(model, mesh)
    width = max(len(r[0]) for r in rows)
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    print(f"mesh {dict(mesh.shape) if not mesh.empty else 'none (1 device)'}")
    print(f"{'parameter':<{width}}  {'shape':<16} {'logical':<24} {'mesh spec':<20} {'bytes/device':>14}")
    for name, shape, spec, nbytes, logical in rows:
        print(f"{name:<{width}}  {str(shape):<16} {str(logical):<24} {str(spec):<20} {nbytes:>14,}")
    print(f"total {sum(r[3] for r in rows):,} bytes/device; {100 * fraction:.1f}% of parameter bytes sharded on fsdp")
