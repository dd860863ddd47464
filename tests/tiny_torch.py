"""The PyTorch side of the tiny checkpoints: transformers' model of a checkpoint directory, and what it computes.

Only tests that compare with PyTorch import this, after `pytest.importorskip("torch")` (conftest's `torch_checkpoint`
fixture does that for them), so that the rest of the suite runs where torch is not installed.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers


def load_model(directory) -> transformers.PreTrainedModel:
    """The float32 model that `AutoModelForCausalLM.from_pretrained` loads from `directory` (bfloat16 and float16
    weights upcast exactly), in eval mode. The checkpoint must hold exactly the model's tensors: one it lacked would
    be drawn at random, and the comparisons would compare with a model nobody wrote."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def hf_logits(model, tokens, mask=None, positions=None) -> np.ndarray:
    """float32 logits of a torch model for int tokens [B, T]."""
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False, **kwargs)
    return out.logits.float().numpy()


def hf_greedy(model, prompt, new: int, eos_id=None, pad_id: int = 0) -> list[int]:
    """transformers' greedy continuation of one prompt alone (no padding), without the prompt."""
    config = transformers.GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt) :].tolist()


def eval_loss(model, rows) -> float:
    """Sum of the next-token cross-entropy over every row (right-padded), divided by the number of predicted
    tokens."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="none")
    weights = mask[:, 1:].reshape(-1).double()
    return ((ce * weights).sum() / weights.sum()).item()
