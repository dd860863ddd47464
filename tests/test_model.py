"""jaxtok's Llama computes the logits transformers' LlamaForCausalLM computes (float32, rel_err <= 1e-5)."""

from __future__ import annotations

import contextlib
import copy

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import tiny
from jaxtok.convert import load_pretrained
from jaxtok.model import logical_axes_of

TOL = 1e-5


def check_against_hf(directory, hf_model, tokens, mask, positions):
    """Compares logits on the non-padding positions; returns the HF logits."""
    import tiny_torch  # the callers hold a torch model

    model, params = load_pretrained(str(directory), dtype="float32")
    ours = tiny.jax_logits(model, params, tokens, positions, mask)
    ref = tiny_torch.hf_logits(hf_model, tokens, mask, positions)
    real = mask.astype(bool)
    assert np.isfinite(ours[real]).all()
    err = tiny.rel_err(ours[real], ref[real])
    assert err <= TOL, f"rel_err {err:.2e} against transformers"
    return ref


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_logits_match_hf_left_padded(torch_checkpoint, kv_heads, tied):
    directory, hf = torch_checkpoint(kv_heads=kv_heads, tied=tied)
    # One full row, two left-padded rows: HF gets attention_mask and cumsum positions, we get segment ids 0/1.
    tokens, mask, positions = tiny.left_padded([12, 9, 4], 12, seed=kv_heads)
    check_against_hf(directory, hf, tokens, mask, positions)


@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (8, 2)])
def test_head_dim_independent_of_hidden(torch_checkpoint, heads, kv_heads):
    """head_dim stays 16 with hidden 64, so heads * head_dim != hidden (o_proj is [64, heads * 16])."""
    directory, hf = torch_checkpoint(heads=heads, kv_heads=kv_heads)
    tokens, mask, positions = tiny.left_padded([8, 5], 8, seed=heads)
    check_against_hf(directory, hf, tokens, mask, positions)


def test_default_positions_and_segments(torch_checkpoint, tiny_torch):
    """Without positions and segment ids the model reads one unpadded sequence per row, like HF without a mask."""
    directory, hf = torch_checkpoint()
    tokens = np.random.default_rng(1).integers(0, 320, size=(2, 10)).astype(np.int32)
    model, params = load_pretrained(str(directory))
    logits, cache = jax.jit(model.apply)({"params": params}, tokens)
    assert cache is None
    assert tiny.rel_err(np.asarray(logits), tiny_torch.hf_logits(hf, tokens)) <= TOL


def test_packed_segments_match_separate_documents(torch_checkpoint, tiny_torch):
    """Two documents packed in one row (segment ids 1, 2; positions restart) give each document's own logits."""
    directory, hf = torch_checkpoint()
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, 320, size=7), rng.integers(0, 320, size=5)
    tokens = np.concatenate([doc_a, doc_b, [0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32)
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32)
    model, params = load_pretrained(str(directory))
    ours = tiny.jax_logits(model, params, tokens, positions, segments)[0]
    assert tiny.rel_err(ours[:7], tiny_torch.hf_logits(hf, doc_a[None])[0]) <= TOL
    assert tiny.rel_err(ours[7:12], tiny_torch.hf_logits(hf, doc_b[None])[0]) <= TOL


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize(
    "original", [16, 32], ids=["orig16", "orig32"]
)  # head_dim 16, theta 1e4: wavelengths 6.3, 20, 63, ...; 16 puts them in the medium and low bands, 32 in all three
def test_llama3_rope(torch_checkpoint, original):
    rope = dict(LLAMA3, original_max_position_embeddings=original)
    directory, hf = torch_checkpoint(rope=rope, max_position_embeddings=128)
    tokens, mask, positions = tiny.left_padded([100, 70], 100, seed=3)  # positions up to 99, far beyond `original`
    check_against_hf(directory, hf, tokens, mask, positions)


def test_linear_rope(torch_checkpoint):
    directory, hf = torch_checkpoint(rope={"rope_type": "linear", "factor": 2.0})
    tokens, mask, positions = tiny.left_padded([40, 25], 40, seed=4)
    check_against_hf(directory, hf, tokens, mask, positions)


@pytest.mark.parametrize(
    "T, offset, scaled",
    [(20, 0, False), (48, 0, True), (10, 40, True)],
    ids=["within-max", "beyond-max", "offset-positions-beyond-max"],
)
def test_dynamic_rope(torch_checkpoint, T, offset, scaled):
    """NTK scaling from max(positions) + 1 of the call; each case runs one forward on a fresh HF model."""
    directory, pristine = torch_checkpoint(rope={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32)
    hf = copy.deepcopy(pristine)  # HF caches the rescaled frequencies in the module between calls
    tokens, mask, positions = tiny.left_padded([T, T - 3], T, seed=5)
    positions = positions + offset
    check_against_hf(directory, hf, tokens, mask, positions)
    rotary = hf.model.rotary_emb
    assert bool((rotary.inv_freq != rotary.original_inv_freq).any()) == scaled  # the case tests what it says


class TestJitAndNoJit(chex.TestCase):
    """The forward pass computes the same logits compiled and eagerly (every jit inside it off too)."""

    @pytest.fixture(autouse=True)
    def _jitted(self, checkpoint):
        self.model, self.params = load_pretrained(str(checkpoint()))
        self.tokens, self.mask, self.positions = tiny.left_padded([8, 5], 8, seed=6)
        self.jitted = tiny.jax_logits(self.model, self.params, self.tokens, self.positions, self.mask, jit=True)

    @chex.variants(with_jit=True, without_jit=True)
    def test_logits_agree(self):
        apply = self.variant(self.model.apply)
        eager = self.variant.type is chex.ChexVariantType.WITHOUT_JIT
        with jax.disable_jit() if eager else contextlib.nullcontext():
            logits, _ = apply({"params": self.params}, self.tokens, self.positions, self.mask)
        real = self.mask.astype(bool)
        assert tiny.rel_err(np.asarray(logits, np.float32)[real], self.jitted[real]) <= TOL


def _find(tree, *path):
    """Walks `path`, each step a key or a tuple of alternative keys; a module holding a `kernel` yields the kernel."""
    node = tree
    for step in path:
        keys = (step,) if isinstance(step, str) else step
        key = next((k for k in keys if k in node), None)
        assert key is not None, f"none of {keys} in {sorted(node)}"
        node = node[key]
    if isinstance(node, dict) and "kernel" in node:
        node = node["kernel"]
    return node


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logical_axes(checkpoint, tied):
    model, params = load_pretrained(str(checkpoint(tied=tied)))
    axes = logical_axes_of(model)["params"]
    expected = {
        ("embed",): ("vocab", "embed"),
        ("layers", "attn", ("q", "q_proj")): ("layers", "embed", "heads", "head_dim"),
        ("layers", "attn", ("k", "k_proj")): ("layers", "embed", "kv_heads", "head_dim"),
        ("layers", "attn", ("v", "v_proj")): ("layers", "embed", "kv_heads", "head_dim"),
        ("layers", "attn", ("o", "o_proj")): ("layers", "heads", "head_dim", "embed"),
        ("layers", "mlp", ("gate", "gate_proj")): ("layers", "embed", "mlp"),
        ("layers", "mlp", ("up", "up_proj")): ("layers", "embed", "mlp"),
        ("layers", "mlp", ("down", "down_proj")): ("layers", "mlp", "embed"),
        ("layers", "attn_norm", "scale"): ("layers", "embed"),
        ("layers", "mlp_norm", "scale"): ("layers", "embed"),
        ("final_norm", "scale"): ("embed",),
    }
    if not tied:
        expected[("lm_head",)] = ("embed", "vocab")
    for path, names in expected.items():
        spec = _find(axes, *path)
        assert isinstance(spec, PartitionSpec), (path, spec)
        assert tuple(spec) == names, (path, spec)
    assert ("lm_head" in axes) == (not tied)

    # The loaded params have exactly the tree of the axes, one name per dimension, and no boxed leaves.
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    specs, spec_tree = jax.tree.flatten(axes, is_leaf=is_spec)
    arrays, param_tree = jax.tree.flatten(params)
    assert spec_tree == param_tree
    for spec, array in zip(specs, arrays):
        assert isinstance(array, jax.Array)
        assert len(spec) == array.ndim and all(isinstance(n, str) for n in spec), (spec, array.shape)
    L = model.config.num_layers
    assert all(spec[0] == "layers" and a.shape[0] == L for spec, a in zip(specs, arrays) if "layers" in spec)


def test_wrong_shapes_fail_by_name_before_xla(checkpoint):
    model, params = load_pretrained(str(checkpoint()))
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(AssertionError, match="rank"):
        model.apply({"params": params}, tokens[0])  # one sequence without its batch axis
    with pytest.raises(AssertionError, match="type"):
        model.apply({"params": params}, tokens.astype(np.float32))
    with pytest.raises(AssertionError, match=r"\(2, 5\)"):
        model.apply({"params": params}, tokens, segment_ids_BT=np.ones((2, 4), np.int32))
    with pytest.raises(AssertionError, match=r"\(2, 5\)"):
        model.apply({"params": params}, tokens, loss_mask_BT=np.ones((5,), np.int32))


def test_swiglu_gradient_equals_autodiff():
    """The MLP activation's written-out backward gives autodiff's gradients of silu(gate) * up."""
    import jax.numpy as jnp

    from jaxtok.model import swiglu

    rng = np.random.default_rng(0)
    gate, up, w = (jnp.asarray(rng.normal(size=(2, 3, 16)) * 4, jnp.float32) for _ in range(3))
    ours = jax.grad(lambda g, u: jnp.sum(swiglu(g, u) * w), (0, 1))(gate, up)
    theirs = jax.grad(lambda g, u: jnp.sum(jax.nn.silu(g) * u * w), (0, 1))(gate, up)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("differentiate_kernel", [False, True])
def test_frozen_linear_gradient_equals_autodiff(differentiate_kernel):
    """The frozen matmul's written-out backward gives autodiff's gradient of the einsum on the kernel as stored
    ([D, N, H]), for x, and for the kernel where it is differentiated."""
    import jax.numpy as jnp

    from jaxtok.model import frozen_linear

    rng = np.random.default_rng(0)
    x_BTD, kernel_DNH, w_BTNH = (jnp.asarray(rng.normal(size=s), jnp.float32)
                                 for s in [(2, 3, 8), (8, 2, 5), (2, 3, 2, 5)])
    argnums = (0, 1) if differentiate_kernel else 0

    def loss(project):
        return lambda x, kernel: jnp.sum(project(x, kernel) * w_BTNH)

    ours = jax.grad(loss(lambda x, k: frozen_linear(x, k).reshape(2, 3, 2, 5)), argnums)(x_BTD, kernel_DNH)
    theirs = jax.grad(loss(lambda x, k: jnp.einsum("btd,dnh->btnh", x, k)), argnums)(x_BTD, kernel_DNH)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-6)


def _saved_residuals(capsys, model, tokens) -> list[str]:
    """One line per value the train step's backward keeps, e.g. "f32[2,2,5,48] output of ..." (LoRA trained)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.ad_checkpoint import print_saved_residuals

    from jaxtok import trainable

    train, frozen = trainable.split(nn.unbox(model.init(jax.random.key(0), tokens)), "lora")

    def loss(train):
        (total, count), _ = model.apply(trainable.merge(train, frozen), tokens, loss_mask_BT=jnp.ones_like(tokens))
        return total / count

    print_saved_residuals(loss, train)
    return capsys.readouterr().out.splitlines()


def test_backward_keeps_no_copy_of_a_kernel(capsys):
    """The projections' backward reads each layer's kernel as the layer scan slices it from the frozen (constant)
    stack: no flattened or transposed copy of a kernel is kept per layer (jaxtok.model, frozen_linear)."""
    import jax.numpy as jnp

    from jaxtok.llama_config import LlamaConfig
    from jaxtok.lora import LoraConfig
    from jaxtok.model import Llama

    L, D, N, K, H, F = 2, 24, 2, 1, 8, 40
    config = LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=N,
                         num_kv_heads=K, head_dim=H)
    kept = _saved_residuals(capsys, Llama(config, lora=LoraConfig(rank=4, targets="all-linear")),
                            jnp.ones((2, 5), jnp.int32))
    kernels = [(D, N * H), (D, K * H), (N * H, D), (D, F), (F, D)]  # q, k/v, o, gate/up, down
    shapes = {f"[{L},{a},{b}]" for a, b in kernels} | {f"[{L},{b},{a}]" for a, b in kernels}
    copies = [line for line in kept if line.split(" ")[0][3:] in shapes and "from a constant" not in line]
    assert kept and not copies


def test_backward_keeps_only_gate_and_up_of_the_mlp(capsys):
    """Of the MLP's [B, T, F] activations the backward keeps gate and up only, with LoRA on down_proj too: its input
    silu(gate) * up is recomputed (jaxtok.model, Mlp)."""
    import jax.numpy as jnp

    from jaxtok.llama_config import LlamaConfig
    from jaxtok.lora import LoraConfig
    from jaxtok.model import Llama

    L, B, T, F = 2, 2, 5, 48
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=F, num_layers=L, num_heads=2,
                         num_kv_heads=1, head_dim=8)
    kept = _saved_residuals(capsys, Llama(config, lora=LoraConfig(rank=4, targets="all-linear")),
                            jnp.ones((B, T), jnp.int32))
    assert sum(line.startswith(f"f32[{L},{B},{T},{F}] ") for line in kept) == 2
