"""One mesh (data, fsdp, tensor) and the one table that maps the model's logical axis names onto it.

Every parameter carries logical names (`model.logical_axes_of`), so placing a tree is a lookup:

    logical      mesh axis    why
    batch        data, fsdp   each data and fsdp group reads its own rows
    embed        fsdp         the frozen base is split over fsdp: what lets large models fit
    vocab, heads, kv_heads, mlp
                 tensor       tensor parallelism over heads and the mlp
    others       -            replicated (layers, head_dim, lora_rank, token_rows)

A dimension that does not divide by its mesh axis stays replicated rather than failing (a model with one kv head
on a tensor axis of 2, say), and a mesh axis is used at most once per array. LoRA and token rows follow the same
rules: their `embed` side splits over fsdp like the base they adapt.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtok.errors import JaxtokError

AXES = ("data", "fsdp", "tensor")
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
}


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 to "the rest of the devices" and checks that the shape uses every device."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(AXES) or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise JaxtokError(f"mesh.shape must be 3 positive sizes (data, fsdp, tensor), one may be -1; got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise JaxtokError(f"mesh.shape {shape} does not divide the {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise JaxtokError(f"mesh.shape {shape} has {math.prod(shape)} places for {num_devices} devices; "
                          "make the product equal the device count (or use -1)")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Optional[Sequence] = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names, skipping axes that do not divide or repeat."""
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for name, size in zip(logical, shape):
        rule = RULES.get(name, ()) if name is not None else ()
        axes = tuple(a for a in rule if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given the matching tree of logical specs."""
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, spec_for(tuple(spec), x.shape, mesh)),
        abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[A, B, T] batches: rows split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, RULES["batch"], None))


def global_array(full: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds: each process copies only its devices' shards."""
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def global_batch(batches, step: int, sharding: NamedSharding) -> dict[str, jax.Array]:
    """The batch of `step` as global [A, B, T] arrays; each process reads only the rows its own devices hold.

    A batch is a function of (seed, step), so any process can read any rows: which rows are whose is left to the
    mesh, however it spreads over hosts.
    """
    shapes = batches.shapes()
    read: dict = {}

    def rows(key, index):
        span = index[1].indices(shapes[key][1])  # slices are not hashable before Python 3.12
        if span not in read:  # one read per distinct row slice serves every key
            read[span] = batches.batch(step, rows=index[1])
        return read[span][key][index[0]][..., index[2]]

    return {key: jax.make_array_from_callback(shape, sharding, functools.partial(rows, key))
            for key, shape in shapes.items()}


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                           auto: bool = False) -> None:
    """Joins JAX's multi-controller runtime: explicitly (coordinator address, process count and id), or with
    `auto` through the environment detection of `jax.distributed.initialize()` (SLURM, TPU pods, Open MPI, ...)."""
    if not coordinator and not auto:
        return
    # Collectives between CPU processes need gloo; the setting touches the CPU client only, so GPU and TPU runs are
    # unaffected. (Asking which backend is in use here would start it, which must wait until after initialize.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
        return
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise JaxtokError(f"distributed.num_processes ({num_processes}) and distributed.process_id ({process_id}) "
                          "must describe this process: 0 <= process_id < num_processes")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
