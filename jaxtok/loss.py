"""Next-token cross-entropy, the one loss definition shared by training, evaluation and tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits_BTV: jnp.ndarray, tokens_BT: jnp.ndarray, target_mask_BT: jnp.ndarray):
    """Sum and count of the cross-entropy of predicting `tokens[:, t]` from position t-1, over t with a true mask.

    `target_mask[:, 0]` is ignored (nothing predicts the first token). Computed in float32 whatever the logits' dtype.
    Returning the sum and the count, not the mean, lets callers add up batches and rows exactly.
    """
    logits_BTV = logits_BTV[:, :-1].astype(jnp.float32)
    targets_BT = tokens_BT[:, 1:]
    weights_BT = target_mask_BT[:, 1:].astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z_BT - picked_BT) * weights_BT), jnp.sum(weights_BT)
