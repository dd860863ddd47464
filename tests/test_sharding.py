"""The mesh and its logical-axis rules; placement on 8 CPU devices; the same training on every mesh.

The pure parts run here on an `AbstractMesh` (no devices needed). Everything that needs 8 devices runs in child
processes (`mesh_worker.py`) started with XLA_FLAGS=--xla_force_host_platform_device_count=8, since this process may
already have started JAX with one device.
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import mesh_files
from jaxtok import trainable as trainable_lib
from jaxtok.errors import JaxtokError
from jaxtok.llama_config import LlamaConfig
from jaxtok.lora import LoraConfig
from jaxtok.model import Llama, abstract_variables, logical_axes_of
from jaxtok.optimizer import OptimConfig, make_optimizer
from jaxtok.sharding import AXES, RULES, make_mesh, mesh_shape, spec_for, tree_shardings
from jaxtok.step import state_shardings
from jaxtok.tokens import TokenRows

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
LOSS_TOL = 1e-5  # relative, per logged step (observed <= 4e-7)
GRAD_TOL = 1e-5  # per element, of max|gradient| per tensor (observed ~1.3e-6)
# Final adapters after 4 AdamW steps. AdamW divides each element's update by its own gradient's size, so an element
# whose gradients are all near zero turns float rounding (gradients agree to ~1e-6, see the SGD check) into a visible
# change: observed up to 2.1e-5 of max|ref| with this config (and up to ~1e-3 with other seeds or with dropout).
ADAPTER_TOL = 5e-5


def abstract_mesh(shape) -> AbstractMesh:
    return AbstractMesh(tuple(shape), AXES)


# ---------------------------------------------------------------------------------------------------- mesh_shape


@pytest.mark.parametrize("shape, devices, expected", [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((2, 2, -1), 8, (2, 2, 2)),
    ((1, -1, 1), 1, (1, 1, 1)),
    ((2, 4, 1), 8, (2, 4, 1)),
    ([1, 2, 2], 4, (1, 2, 2)),
])
def test_mesh_shape_resolves(shape, devices, expected):
    assert mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, devices, message", [
    ((2, 4), 8, "3 positive sizes"),
    ((1, 2, 2, 2), 8, "3 positive sizes"),
    ((-1, -1, 2), 8, "3 positive sizes"),
    ((0, 8, 1), 8, "3 positive sizes"),
    ((-2, 4, 1), 8, "3 positive sizes"),
    ((3, -1, 1), 8, "does not divide"),
    ((2, 2, 1), 8, "places for 8 devices"),
    ((2, 2, 2), 4, "places for 4 devices"),
    ((1, 16, 1), 8, "places for 8 devices"),
])
def test_mesh_shape_rejects(shape, devices, message):
    with pytest.raises(JaxtokError, match=message):
        mesh_shape(shape, devices)


def test_make_mesh_uses_every_device_and_the_axis_names():
    n = jax.device_count()
    mesh = make_mesh((1, -1, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor") == AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": n, "tensor": 1}
    with pytest.raises(JaxtokError):
        make_mesh((n + 1, 1, 1))


# ---------------------------------------------------------------------------------------------------- spec_for


def test_rules_table():
    assert RULES == {"batch": ("data", "fsdp"), "embed": ("fsdp",), "vocab": ("tensor",), "heads": ("tensor",),
                     "kv_heads": ("tensor",), "mlp": ("tensor",)}


@pytest.mark.parametrize("name, axis", [("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
                                        ("kv_heads", "tensor"), ("mlp", "tensor")])
def test_spec_for_maps_each_logical_name(name, axis):
    assert spec_for((name,), (8,), abstract_mesh((2, 2, 2))) == P(axis)


@pytest.mark.parametrize("name", ["layers", "head_dim", "lora_rank", "token_rows", None, "unknown"])
def test_spec_for_replicates_unlisted_names(name):
    assert spec_for((name,), (8,), abstract_mesh((2, 2, 2))) == P(None)


def test_spec_for_batch_uses_data_and_fsdp_together():
    assert spec_for((None, "batch", None), (1, 8, 4), abstract_mesh((2, 2, 2))) == P(None, ("data", "fsdp"), None)
    # an axis of size 1 is left out, so the spec names the one axis that splits
    assert spec_for(("batch",), (8,), abstract_mesh((1, 8, 1))) == P("fsdp")
    assert spec_for(("batch",), (8,), abstract_mesh((8, 1, 1))) == P("data")
    assert spec_for(("batch",), (8,), abstract_mesh((1, 1, 8))) == P(None)


def test_spec_for_never_uses_a_mesh_axis_twice():
    mesh = abstract_mesh((2, 2, 2))
    assert spec_for(("embed", "embed"), (8, 8), mesh) == P("fsdp", None)
    assert spec_for(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)
    assert spec_for(("vocab", "embed", "heads"), (8, 8, 8), mesh) == P("tensor", "fsdp", None)
    assert spec_for(("batch", "embed"), (8, 8), mesh) == P(("data", "fsdp"), None)
    # the batch group still claims fsdp when data is 1
    assert spec_for(("batch", "embed"), (8, 8), abstract_mesh((1, 8, 1))) == P("fsdp", None)
    for spec in (spec_for(names, (8,) * len(names), mesh) for names in
                 [("embed", "vocab", "heads", "kv_heads", "mlp", "batch"), ("batch", "batch", "embed")]):
        used = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        assert len(used) == len(set(used)), spec


def test_spec_for_replicates_dimensions_that_do_not_divide():
    mesh = abstract_mesh((2, 2, 2))
    assert spec_for(("vocab", "embed"), (301, 64), mesh) == P(None, "fsdp")
    assert spec_for(("kv_heads",), (1,), mesh) == P(None)
    assert spec_for(("embed",), (6,), abstract_mesh((1, 4, 2))) == P(None)
    assert spec_for(("batch",), (2,), mesh) == P(None)  # 2 rows do not split 4 ways
    # an axis a dimension could not take stays free for a later dimension
    assert spec_for(("heads", "mlp"), (3, 8), mesh) == P(None, "tensor")


# ---------------------------------------------------------------------------------------------------- a tiny model


def tiny_model() -> Llama:
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    return Llama(config, lora=LoraConfig(rank=4, targets="all-linear"), token_rows=TokenRows((300, 1), (300,)))


IN_TENSOR = ("o_proj", "down_proj")  # their input side is heads / mlp (tensor), their output side embed (fsdp)


def expected_222() -> dict[str, tuple]:
    """The rules applied by hand to the tiny model (L=2, D=64, N=4, K=2, H=16, F=128, V=320, R=4) on (2, 2, 2)."""
    e = {
        "params/embed": ("tensor", "fsdp"),  # [V, D]
        "params/lm_head": ("fsdp", "tensor"),  # [D, V]
        "params/final_norm/scale": ("fsdp",),  # [D]: norms are `embed` too
        "params/layers/attn_norm/scale": (None, "fsdp"),
        "params/layers/mlp_norm/scale": (None, "fsdp"),
        "params/layers/attn/q_proj/kernel": (None, "fsdp", "tensor", None),  # [L, D, N, H]
        "params/layers/attn/k_proj/kernel": (None, "fsdp", "tensor", None),  # [L, D, K, H]
        "params/layers/attn/v_proj/kernel": (None, "fsdp", "tensor", None),
        "params/layers/attn/o_proj/kernel": (None, "tensor", None, "fsdp"),  # [L, N, H, D]
        "params/layers/mlp/gate_proj/kernel": (None, "fsdp", "tensor"),  # [L, D, F]
        "params/layers/mlp/up_proj/kernel": (None, "fsdp", "tensor"),
        "params/layers/mlp/down_proj/kernel": (None, "tensor", "fsdp"),  # [L, F, D]
        "tokens/embed": (None, "fsdp"),  # [M, D]
        "tokens/head": (None, "fsdp"),
    }
    for group, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            a_in, b_out = ("tensor", "fsdp") if name in IN_TENSOR else ("fsdp", "tensor")
            e[f"lora/layers/{group}/{name}/a"] = (None, None, a_in)  # [L, R, in]
            e[f"lora/layers/{group}/{name}/b"] = (None, b_out, None)  # [L, out, R]
    return e


def _flat(tree) -> dict:
    return {"/".join(str(p.key) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]}


def _normal(spec) -> tuple:
    """A spec as a tuple without trailing Nones (P('a', None) and P('a') place alike)."""
    out = list(spec)
    while out and out[-1] is None:
        out.pop()
    return tuple(tuple(a) if isinstance(a, list) else a for a in out)


def model_shardings(shape) -> dict[str, NamedSharding]:
    model = tiny_model()
    return _flat(tree_shardings(nn.unbox(abstract_variables(model)), logical_axes_of(model), abstract_mesh(shape)))


def test_tree_shardings_of_a_model_with_lora_and_token_rows():
    got = {k: _normal(s.spec) for k, s in model_shardings((2, 2, 2)).items()}
    expected = {k: _normal(v) for k, v in expected_222().items()}
    assert got == expected


def test_tree_shardings_on_other_meshes():
    s241 = model_shardings((2, 4, 1))
    assert s241["params/layers/attn/q_proj/kernel"].spec == P(None, "fsdp", None, None)
    assert s241["params/embed"].spec == P(None, "fsdp")
    assert s241["lora/layers/attn/q_proj/b"].spec == P(None, None, None)
    # (1, 1, 8): fsdp is 1 so nothing splits over it; 4 heads and 2 kv heads do not divide 8 and stay whole,
    # while the vocabulary (320) and the mlp (128) do divide
    s118 = model_shardings((1, 1, 8))
    assert s118["params/layers/attn/q_proj/kernel"].spec == P(None, None, None, None)
    assert s118["params/layers/attn/k_proj/kernel"].spec == P(None, None, None, None)
    assert s118["params/layers/mlp/up_proj/kernel"].spec == P(None, None, "tensor")
    assert s118["params/embed"].spec == P("tensor", None)
    assert s118["lora/layers/mlp/down_proj/a"].spec == P(None, None, "tensor")
    # (8, 1, 1): pure data parallelism, every parameter whole on every device
    assert all(_normal(s.spec) == () for s in model_shardings((8, 1, 1)).values())


def test_optimizer_moments_follow_their_parameter():
    mesh = abstract_mesh((2, 2, 2))
    model = tiny_model()
    variables = nn.unbox(abstract_variables(model))
    trainable, _ = trainable_lib.split(variables)
    logical = {k: v for k, v in logical_axes_of(model).items() if k in trainable}
    shardings = tree_shardings(trainable, logical, mesh)
    optimizer = make_optimizer(OptimConfig(token_lr=1e-2), trainable_lib.labels(trainable))
    state = state_shardings(optimizer, trainable, shardings, mesh)

    params = {k: s for k, s in _flat(shardings).items()}
    found: dict[str, list] = {k: [] for k in params}
    scalars = []
    for path, sharding in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        names = "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
        owner = [k for k in params if names.endswith(k)]
        if owner:
            found[owner[0]].append(sharding)
        else:
            scalars.append(sharding)
    for name, shardings_found in found.items():
        assert len(shardings_found) == 2, f"{name}: expected mu and nu, found {len(shardings_found)}"
        assert all(s == params[name] for s in shardings_found), name
    assert scalars and all(_normal(s.spec) == () for s in scalars)
    # one shape, two placements: the moments were matched by path, not by shape
    assert trainable["lora"]["layers"]["attn"]["q_proj"]["a"].shape == trainable["lora"]["layers"]["attn"]["o_proj"][
        "a"].shape
    assert params["lora/layers/attn/q_proj/a"] != params["lora/layers/attn/o_proj/a"]
    assert _normal(state.step.spec) == () and _normal(state.rng.spec) == ()
    assert state.trainable is shardings


# ---------------------------------------------------------------------------------------------------- 8 devices


MESH_WORKERS = pytest.mark.slow  # two worker processes train on every mesh


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs the job on every mesh of MESHES (8 devices, one process) and on 1 device, side by side, plus the
    placement checks on 8 devices; returns (root, worker result)."""
    root = mesh_files.write_files(tmp_path_factory.mktemp("sharding"))
    config = str(root / "config.py")
    eight = {
        "config": config,
        "runs": [{"mesh": list(m), "output_dir": str(root / "out" / "x".join(map(str, m)))} for m in MESHES],
        "checks": {"model_dir": str(root / "model"), "loading_mesh": [2, 4, 1], "build_mesh": [2, 2, 2],
                   "output_dir": str(root / "build")},
    }
    one = {"config": config, "runs": [{"mesh": [1, 1, 1], "output_dir": str(root / "out" / "ref")}]}
    group = mesh_files.Group(root / "logs")
    group.start("eight", [sys.executable, str(mesh_files.WORKER), json.dumps(eight)], mesh_files.env(8))
    group.start("one", [sys.executable, str(mesh_files.WORKER), json.dumps(one)], mesh_files.env(1))
    logs = group.wait(timeout=600)
    results = {}
    for name, text in logs.items():
        lines = [line for line in text.splitlines() if line.startswith("MESH_WORKER_RESULT ")]
        assert lines, f"{name} printed no result:\n{text[-3000:]}"
        results[name] = json.loads(lines[-1].split(" ", 1)[1])
    assert results["eight"]["devices"] == 8 and results["one"]["devices"] == 1
    return root, results["eight"]


@MESH_WORKERS
def test_loading_goes_straight_into_shards(runs):
    loading = runs[1]["loading"]
    assert loading["mismatched"] == []  # every array's sharding is what tree_shardings says
    assert loading["placements"] > 0 and loading["off_mesh"] == []  # never placed whole on one device
    assert loading["q_spec"] == [None, "fsdp"]  # q_proj kernel on (2, 4, 1)
    assert loading["q_distinct_shards"] == 4  # D split 4 ways (replicated over data)
    assert loading["q_shard_shapes"] == [[2, 16, 4, 16]] and loading["q_full_shape"] == [2, 64, 4, 16]
    assert loading["q_shards_are_slices"]


@MESH_WORKERS
def test_build_places_every_array_by_the_rules(runs):
    build = runs[1]["build"]
    got = {k: _normal(v["spec"]) for k, v in build["specs"].items()}
    assert got == {k: _normal(v) for k, v in expected_222().items()}
    assert all(v["on_mesh"] for v in build["specs"].values())
    assert build["batch_spec"] == [None, ["data", "fsdp"]]
    assert build["batch_equal"] and build["batch_shard_rows"] == [2]


@MESH_WORKERS
def test_sharded_gradients_match_one_device(runs):
    grads = runs[1]["build"]["gradients"]
    assert grads["on_mesh"]
    assert grads["zero_gradients"] == [] and len(grads["errors"]) == 16  # 7 LoRA pairs and 2 token tables
    assert abs(grads["loss"] - grads["single_loss"]) <= LOSS_TOL * abs(grads["single_loss"])
    bad = {k: e for k, e in grads["errors"].items() if not e <= GRAD_TOL}
    assert not bad, bad


@MESH_WORKERS
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_every_mesh_trains_like_one_device(runs, mesh):
    root = runs[0]
    ref_dir, out = root / "out" / "ref", root / "out" / "x".join(map(str, mesh))
    ref, got = mesh_files.records(ref_dir), mesh_files.records(out)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        for key in ("loss", "grad_norm"):
            assert abs(got[step][key] - ref[step][key]) <= LOSS_TOL * abs(ref[step][key]), (step, key)
        assert got[step]["tokens"] == ref[step]["tokens"]
    bad = mesh_files.compare_adapters(mesh_files.adapter(out), mesh_files.adapter(ref_dir), ADAPTER_TOL)
    assert not bad, bad
