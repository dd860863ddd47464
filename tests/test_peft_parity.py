"""LoRA + trainable tokens train exactly as PEFT + torch.optim.AdamW do, from the same start on the same batches."""

from __future__ import annotations

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from jaxtok import trainable
from jaxtok.convert import load_pretrained
from jaxtok.lora import LoraConfig
from jaxtok.optimizer import OptimConfig, make_optimizer, schedule
from jaxtok.peft_format import from_peft, to_peft
from jaxtok.step import init_state, make_train_step
from jaxtok.tokens import TokenRows

IDS = (5, 17, 42, 300)
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
STEPS, B, T = 5, 3, 12
OPTIM = OptimConfig(lr=1e-2, token_lr=3e-2, weight_decay=0.1, token_weight_decay=0.0, warmup_steps=2,
                    schedule="linear", total_steps=6, max_grad_norm=0.5)


def _batches(seed=0):
    """Random right-padded batches that contain the trained ids; loss on real tokens only."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(STEPS):
        tokens = rs.randint(0, 320, (B, T))
        chosen = rs.rand(B, T) < 0.3
        tokens[chosen] = rs.choice(IDS, chosen.sum())
        lengths = rs.randint(T // 2, T + 1, B)
        segments = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
        tokens = tokens * segments
        out.append(dict(tokens=tokens, segments=segments))
    return out


def _random_adapters(adapters, seed=1):
    """Non-zero B and perturbed token rows, so every path of the gradient is exercised."""
    leaves, treedef = jax.tree.flatten(adapters)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(treedef, [np.asarray(x) + 0.05 * rs.randn(*x.shape).astype(np.float32) for x in leaves])


def _torch_run(hf_model, tied, adapters, batches):
    import peft
    import torch

    token_indices = list(IDS) if tied else {"embed_tokens": list(IDS), "lm_head": list(IDS)}
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS),
                             trainable_token_indices=token_indices)
    model = peft.get_peft_model(hf_model, config)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in to_peft(adapters).items()}
    result = peft.set_peft_model_state_dict(model, tensors)
    assert not result.unexpected_keys
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    token_params = [p for n, p in named.items() if "trainable_tokens_delta" in n]
    lora_params = [p for n, p in named.items() if "lora_" in n]
    assert len(token_params) + len(lora_params) == len(named) == len(tensors)
    optimizer = torch.optim.AdamW(
        [dict(params=lora_params, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay),
         dict(params=token_params, lr=OPTIM.token_lr, weight_decay=OPTIM.token_weight_decay)],
        betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
    )
    multiplier = schedule(OPTIM, 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: float(multiplier(s)))
    losses = []
    for batch in batches:
        tokens = torch.tensor(batch["tokens"])
        mask = torch.tensor(batch["segments"])
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                               reduction="none")
        weights = mask[:, 1:].reshape(-1).float()
        loss = (ce * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), OPTIM.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    state = peft.get_peft_model_state_dict(model)
    return losses, {k: v.detach().numpy() for k, v in state.items()}, model


@pytest.mark.slow  # trains in both frameworks
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_five_steps_match_peft(torch_checkpoint, tied):
    pytest.importorskip("peft")
    directory, hf_model = torch_checkpoint(tied=tied)
    check_five_steps(directory, hf_model, tied)


def check_five_steps(directory, hf_model, tied: bool):
    """Five AdamW steps of jaxtok and of PEFT + torch from the same adapters on the same batches give the same losses,
    adapters and logits. Returns (model, its variables after training, the PEFT model after training, the batches)."""
    import torch

    base_model, params = load_pretrained(str(directory))
    rows = TokenRows(IDS, () if tied else IDS)
    model = base_model.clone(lora=LoraConfig(rank=4, alpha=8, targets=TARGETS), token_rows=rows)
    adapters = _random_adapters(trainable.init_adapters(model, params, jax.random.key(0)))
    batches = _batches()

    torch_losses, torch_tensors, peft_model = _torch_run(copy.deepcopy(hf_model), tied, adapters, batches)

    trainable_tree, frozen = trainable.split({"params": params, **jax.tree.map(jnp.asarray, adapters)})
    optimizer = make_optimizer(OPTIM, trainable.labels(trainable_tree))
    step = make_train_step(model, optimizer, schedule(OPTIM, OPTIM.lr))
    # committed to the device, as the step's outputs are: the second step then reuses the first one's program
    state = jax.device_put(init_state(trainable_tree, optimizer, seed=0), jax.devices()[0])
    losses = []
    for batch in batches:
        segments = jnp.asarray(batch["segments"])[None]
        micro = dict(tokens=jnp.asarray(batch["tokens"])[None], segment_ids=segments, loss_mask=segments,
                     positions=jnp.broadcast_to(jnp.arange(T), (1, B, T)))
        state, metrics = step(state, frozen, micro)
        losses.append(float(metrics["loss"]))

    np.testing.assert_allclose(losses, torch_losses, rtol=1e-5)
    ours = to_peft(jax.device_get(state.trainable))
    assert set(ours) == set(torch_tensors)
    for name, value in ours.items():
        # AdamW divides by the root of the second moment, so near-zero gradients that agree to float32 rounding
        # give updates that differ by more: the adapters agree to ~1e-5, the losses and logits to 1e-5 or better.
        assert tiny.rel_err(value, torch_tensors[name]) < 2e-5, name
    # the trained adapter also gives PEFT's logits
    tokens = batches[0]["tokens"]
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()
    variables = trainable.merge(frozen, state.trainable)
    logits, _ = model.apply(variables, jnp.asarray(tokens))
    assert tiny.rel_err(np.asarray(logits), ref) < 1e-5
    return model, variables, peft_model, batches


def test_peft_names_round_trip(checkpoint):
    directory = checkpoint(tied=False)
    base_model, params = load_pretrained(str(directory))
    model = base_model.clone(lora=LoraConfig(rank=2, targets="all-linear"), token_rows=TokenRows((1, 2), (3,)))
    adapters = jax.device_get(trainable.init_adapters(model, params, jax.random.key(0)))
    back = from_peft(to_peft(adapters), model.config.num_layers)
    chex.assert_trees_all_equal(back, adapters)
