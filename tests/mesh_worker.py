"""A child process of test_sharding.py with its own device count (the caller sets XLA_FLAGS and JAX_PLATFORMS).

    python tests/mesh_worker.py '{"config": ..., "runs": [{"mesh": [2, 2, 2], "output_dir": ...}], "checks": {...}}'

`runs`: trains through the library (`jaxtok.train.run`, the config parsed as the command line parses it) once per
mesh, one process for all so each mesh costs a compile only. `checks`: placement facts on real devices. Prints one
line `MESH_WORKER_RESULT <json>` at the end.
"""

from __future__ import annotations

import json
import sys
import time


def _spec(sharding) -> list:
    """A PartitionSpec as JSON, trailing Nones dropped (P('a', None) and P('a') place alike)."""
    out = [list(a) if isinstance(a, tuple) else a for a in sharding.spec]
    while out and out[-1] is None:
        out.pop()
    return out


def _paths(tree) -> dict:
    import jax

    return {"/".join(str(p.key) for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _parse(config_file: str, output_dir: str, mesh, overrides=()):
    from jaxtok.cli import parse_config

    return parse_config(["train.py", f"--config={config_file}", f"--config.output_dir={output_dir}",
                         f"--config.mesh.shape={tuple(mesh)}", *overrides])


def check_loading(model_dir: str, mesh_shape) -> dict:
    """load_pretrained(..., mesh=): every array placed as tree_shardings says, every device_put and buffer made on
    the mesh (never the whole tensor on one device), and q_proj's kernel split into distinct shards."""
    import flax.linen as nn
    import jax
    import numpy as np

    from jaxtok import convert
    from jaxtok.model import abstract_params, logical_axes_of
    from jaxtok.sharding import make_mesh, tree_shardings

    mesh = make_mesh(mesh_shape)
    placements = []
    real_put, real_zeros = jax.device_put, convert._zeros

    def put(x, sharding=None, *a, **k):
        placements.append(sharding)
        return real_put(x, sharding, *a, **k)

    def zeros(shape, dtype, sharding):
        placements.append(sharding)
        return real_zeros(shape, dtype, sharding)

    jax.device_put, convert._zeros = put, zeros
    try:
        model, params = convert.load_pretrained(model_dir, dtype="float32", mesh=mesh)
    finally:
        jax.device_put, convert._zeros = real_put, real_zeros
    expected = tree_shardings(nn.unbox(abstract_params(model)), logical_axes_of(model)["params"], mesh)
    got, want = _paths(params), _paths(expected)
    mismatched = sorted(k for k in want if k not in got or not (
        isinstance(got[k].sharding, jax.sharding.NamedSharding) and got[k].sharding.mesh == mesh
        and _spec(got[k].sharding) == _spec(want[k])))
    off_mesh = [repr(s) for s in placements
                if not (isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh)]

    q = params["layers"]["attn"]["q_proj"]["kernel"]
    full = np.asarray(jax.device_get(q))
    shards = q.addressable_shards
    indices = {tuple((s.start, s.stop) for s in shard.index) for shard in shards}
    return {
        "mismatched": mismatched + ([] if set(got) == set(want) else ["tree structure"]),
        "placements": len(placements),
        "off_mesh": off_mesh,
        "q_spec": _spec(q.sharding),
        "q_distinct_shards": len(indices),
        "q_shard_shapes": sorted({tuple(shard.data.shape) for shard in shards}),
        "q_shards_are_slices": all(np.array_equal(np.asarray(shard.data), full[shard.index]) for shard in shards),
        "q_full_shape": list(full.shape),
    }


def check_build(config_file: str, output_dir: str, mesh_shape) -> dict:
    """setup.build on a mesh: the sharding spec of every frozen parameter and adapter, and a batch's placement."""
    import numpy as np

    from jaxtok import setup as setup_lib
    from jaxtok.run_config import RunConfig
    from jaxtok.sharding import batch_sharding, global_array

    setup = setup_lib.build(RunConfig.of(_parse(config_file, output_dir, mesh_shape)))
    specs = {}
    for prefix, tree in (("params", setup.frozen["params"]), ("", setup.adapters)):
        for path, leaf in _paths(tree).items():
            name = f"{prefix}/{path}" if prefix else path
            specs[name] = {"shape": list(leaf.shape), "spec": _spec(leaf.sharding),
                           "on_mesh": leaf.sharding.mesh == setup.mesh}
    full = np.arange(1 * 8 * 4, dtype=np.int32).reshape(1, 8, 4)
    batch = global_array(full, batch_sharding(setup.mesh))
    return {
        "specs": specs,
        "batch_spec": _spec(batch.sharding),
        "batch_equal": bool(np.array_equal(np.asarray(batch), full)),
        "batch_shard_rows": sorted({shard.data.shape[1] for shard in batch.addressable_shards}),
        "gradients": check_gradients(setup),
    }


def check_gradients(setup) -> dict:
    """One step of plain SGD (lr 1, so the update is the gradient) on the mesh and on one device, unsharded.

    AdamW normalises every element's update, which turns float rounding in a near-zero gradient into a visible
    change of the parameter; the gradients themselves must agree to rounding, element by element. LoRA B starts
    random here (not at zero) so that A has a gradient too.
    """
    import jax
    import numpy as np
    import optax

    from jaxtok import trainable as trainable_lib
    from jaxtok.sharding import batch_sharding, global_array
    from jaxtok.step import init_state, make_train_step, state_shardings

    trainable, frozen = trainable_lib.split(trainable_lib.merge(setup.frozen, setup.adapters))
    rng = np.random.default_rng(0)
    trainable = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(0.05 * rng.standard_normal(x.shape).astype(np.float32), x.sharding)
        if str(path[-1].key) == "b" else x, trainable)
    sgd = optax.sgd(1.0)
    batch = setup.train_data.batch(0)
    on = jax.tree.map(lambda x: x.sharding, (trainable, frozen))
    state_sh = state_shardings(sgd, trainable, on[0], setup.mesh)
    step = make_train_step(setup.model, sgd, lambda s: 1.0, donate=False,
                           shardings=(state_sh, on[1], batch_sharding(setup.mesh)))
    state = jax.device_put(init_state(trainable, sgd, 0), state_sh)
    sharded, metrics = step(state, frozen, {k: global_array(v, batch_sharding(setup.mesh)) for k, v in batch.items()})

    device = jax.devices()[0]

    def one(tree):
        return jax.device_put(jax.device_get(tree), device)

    single, single_metrics = make_train_step(setup.model, sgd, lambda s: 1.0, donate=False)(
        one(init_state(trainable, sgd, 0)), one(frozen), one(batch))

    start = _paths(jax.device_get(trainable))
    new_sharded, new_single = _paths(jax.device_get(sharded.trainable)), _paths(jax.device_get(single.trainable))
    errors, zero = {}, []
    for path, x in start.items():
        x = np.asarray(x, np.float64)
        g, g1 = x - np.asarray(new_sharded[path], np.float64), x - np.asarray(new_single[path], np.float64)
        if not np.any(g1):
            zero.append(path)
            continue
        errors[path] = float(np.max(np.abs(g - g1)) / np.max(np.abs(g1)))
    return {"errors": errors, "zero_gradients": zero, "loss": float(metrics["loss"]),
            "single_loss": float(single_metrics["loss"]),
            "on_mesh": all(x.sharding.mesh == setup.mesh for x in jax.tree.leaves(sharded.trainable))}


def main() -> None:
    spec = json.loads(sys.argv[1])
    tick = time.perf_counter()
    import jax

    result: dict = {"devices": jax.device_count()}
    checks = spec.get("checks")
    if checks:
        result["loading"] = check_loading(checks["model_dir"], checks["loading_mesh"])
        result["build"] = check_build(spec["config"], checks["output_dir"], checks["build_mesh"])
        result["seconds"] = {"checks": time.perf_counter() - tick}

    from jaxtok import train

    for run in spec.get("runs", []):
        tick = time.perf_counter()
        train.run(_parse(spec["config"], run["output_dir"], run["mesh"], run.get("overrides", ())))
        result.setdefault("seconds", {})["x".join(map(str, run["mesh"]))] = time.perf_counter() - tick
    print("MESH_WORKER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
