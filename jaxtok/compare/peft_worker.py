"""The PEFT side of a comparison: the same start, batches, optimizer and schedule, in PyTorch.

Needs torch and peft (`pip install torch==2.13.0 && pip install -e ".[peft]"`). What makes the two frameworks see
the same thing:

* the model: `transformers` loads the start's base checkpoint and `PeftModel.from_pretrained(..., is_trainable=True)`
  its initial adapter (jaxtok's LoRA init and token rows); `lora+full` also trains the embedding and head weights;
* the batches: jaxtok's own, with its positions, and its segment ids turned into a 4-D attention mask (causal, within
  one segment, never to padding), so packed rows attend as they do in jaxtok;
* the loss: the sum of the token cross-entropies over the loss mask's targets of every micro-batch, divided by their
  number (jaxtok's token-weighted mean over the whole step);
* the optimizer: `clip_grad_norm_` over every trained tensor, then `torch.optim.AdamW` with one parameter group per
  jaxtok group (lr, weight decay) and a `LambdaLR` that follows optax's schedule step by step.

LoRA dropout draws different masks in the two frameworks, so losses agree only with lora.dropout = 0. PEFT runs on
the first CUDA GPU where torch has one (jaxtok then runs on its own first device), else on the CPU.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

from jaxtok import compare


def attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: 0 where query t may see key s (s <= t, same segment, not padding), else the
    dtype's minimum. A padding query sees itself only (its output is never used), so no row is empty."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = causal[None] & same & (segment_ids != 0)[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool)[None] & (segment_ids == 0)[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def token_losses(model, batch: dict[str, torch.Tensor], predict: bool = False):
    """Per-target cross-entropy, target weights and (with `predict`) the argmax predictions, each [B, T-1]."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    tokens = batch["tokens"]
    logits = model(input_ids=tokens, position_ids=batch["positions"],
                   attention_mask=attention_mask(batch["segment_ids"], model.dtype)).logits[:, :-1].float()
    targets = tokens[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ce, batch["loss_mask"][:, 1:].float(), logits.argmax(-1) if predict else None


def load_model(start: Path, plan: dict):
    base = transformers.AutoModelForCausalLM.from_pretrained(str(start / "base"), dtype=torch.float32)
    # transformers' `to` is a functools.wraps'd method, which mypy does not bind: it takes the device for `self`
    base.to("cuda" if torch.cuda.is_available() else "cpu")  # type: ignore[arg-type]
    model: peft.PeftModel | transformers.PreTrainedModel
    if (start / "adapter").is_dir():
        model = peft.PeftModel.from_pretrained(base, str(start / "adapter"), is_trainable=True)
    else:
        model = base
        model.requires_grad_(False)
    if plan["method"] == "lora+full":  # a tied head is the same tensor as the embedding
        model.get_input_embeddings().weight.requires_grad_(True)
        model.get_output_embeddings().weight.requires_grad_(True)
    return model


def param_groups(model, plan: dict) -> list[dict]:
    """One AdamW group per jaxtok group (`jaxtok.trainable`), by parameter name."""
    named: dict[str, list] = {"lora": [], "tokens": [], "embeddings": []}
    for name, param in model.named_parameters():  # a tied parameter is listed once
        if not param.requires_grad:
            continue
        group = "lora" if "lora_" in name else "tokens" if "trainable_tokens_delta" in name else "embeddings"
        named[group].append(param)
    return [dict(params=params, **plan["groups"][group]) for group, params in named.items() if params]


def evaluate(model, data: dict[str, np.ndarray], plan: dict) -> dict:
    """Evaluation loss and new-token accuracy, as `jaxtok.evaluate` defines them."""
    model.eval()
    total = count = hits = scored = 0.0
    new_ids = torch.tensor(plan["new_ids"], dtype=torch.long, device=model.device)
    E, size = data["eval_tokens"].shape[0], plan["eval_batch_size"]
    with torch.no_grad():
        for begin in range(0, E, size):
            batch = {k: torch.from_numpy(data[f"eval_{k}"][begin:begin + size]).long() for k in compare.DATA_KEYS}
            ce, weights, predicted = token_losses(model, batch, predict=True)
            targets = batch["tokens"][:, 1:].to(model.device)
            new = weights * torch.isin(targets, new_ids).float()
            total, count = total + float((ce * weights).sum()), count + float(weights.sum())
            hits, scored = hits + float(((predicted == targets).float() * new).sum()), scored + float(new.sum())
    model.train()
    return dict(eval_loss=total / count, new_token_acc=hits / scored if scored else None)


def run(start: Path) -> dict:
    start = Path(start)
    plan = compare.read_plan(start)
    torch.manual_seed(plan["seed"])
    data = dict(np.load(start / "data.npz"))
    model = load_model(start, plan)
    model.train()
    groups = param_groups(model, plan)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=tuple(plan["betas"]), eps=plan["eps"])
    multipliers = plan["lr_multipliers"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: multipliers[min(k, len(multipliers) - 1)])
    steps, evals_at = plan["steps"], plan["eval_steps"]
    evals, losses, times = [dict(step=0, **evaluate(model, data, plan))], [], []
    compare.report_progress(0, steps)
    for step in range(steps):
        begin = time.perf_counter()
        micro = {k: torch.from_numpy(data[f"train_{k}"][step]).long() for k in compare.DATA_KEYS}  # [A, B, T]
        count = micro["loss_mask"][:, :, 1:].sum().clamp(min=1).float()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(micro["tokens"].shape[0]):
            ce, weights, _ = token_losses(model, {k: v[a] for k, v in micro.items()})
            loss_sum = (ce * weights).sum()
            (loss_sum / count).backward()
            total += float(loss_sum.detach())
        if plan["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, plan["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
        losses.append(total / float(count))
        if step + 1 in evals_at[1:]:
            evals.append(dict(step=step + 1, **evaluate(model, data, plan)))
        compare.report_progress(step + 1, steps)
    return dict(
        framework="peft", method=plan["method"], trainable_params=sum(p.numel() for p in params),
        eval_loss_before=evals[0]["eval_loss"], eval_loss_after=evals[-1]["eval_loss"],
        new_token_acc_before=evals[0]["new_token_acc"], new_token_acc_after=evals[-1]["new_token_acc"],
        step_ms=1000 * statistics.median(times[1:] or times), peak_memory_mb=compare.peak_memory_mb(), losses=losses,
        evals=evals, device=torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
    )
