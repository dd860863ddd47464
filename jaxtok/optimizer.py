"""The optimizer: AdamW per trainable group, built over the trainable tree only.

Frozen parameters are not given to the optimizer at all (see `trainable.split`), so they have no gradient and no
optimizer state. The trainable tree is partitioned by `trainable.labels` with `optax.multi_transform`, so LoRA and
token rows can have their own learning rate and weight decay (token rows default to none: with decoupled decay the
rows would shrink towards zero, not towards their original values).

Order of operations matches PyTorch's `clip_grad_norm_` followed by `torch.optim.AdamW` with a `LambdaLR` schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import optax

from jaxtok.errors import JaxtokError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4  # peak learning rate of LoRA (and of full embeddings when trained)
    token_lr: Optional[float] = None  # peak learning rate of token rows; None: same as lr
    weight_decay: float = 0.0  # decoupled weight decay of LoRA
    token_weight_decay: float = 0.0  # decoupled weight decay of token rows
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from 0
    schedule: str = "cosine"  # after warmup: cosine, linear (to min_lr_ratio * lr) or constant
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # clip by global norm over all trainable parameters; 0 turns clipping off
    total_steps: int = 1000

    def __post_init__(self):
        for name in ("lr", "token_lr", "weight_decay", "token_weight_decay", "eps", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise JaxtokError(f"optim.{name} must be a finite non-negative number (got {value!r})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise JaxtokError(f"optim.schedule must be cosine, linear or constant (got {self.schedule!r})")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise JaxtokError("optim.warmup_steps must be >= 0 and the number of steps positive")


def schedule(config: OptimConfig, peak: float) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over warmup_steps, then cosine/linear decay to min_lr_ratio * peak."""
    warmup = max(config.warmup_steps, 0)
    decay_steps = max(config.total_steps - warmup, 1)
    end = peak * config.min_lr_ratio
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config: OptimConfig, label_tree) -> optax.GradientTransformation:
    """Clipping, then one AdamW per group ("lora", "tokens", "embeddings") as `label_tree` assigns them."""

    def adamw(peak: float, decay: float):
        return optax.adamw(schedule(config, peak), config.b1, config.b2, config.eps, weight_decay=decay)

    token_lr = config.lr if config.token_lr is None else config.token_lr
    groups = {
        "lora": adamw(config.lr, config.weight_decay),
        "tokens": adamw(token_lr, config.token_weight_decay),
        "embeddings": adamw(config.lr, config.weight_decay),
    }
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, optax.multi_transform(groups, label_tree))
