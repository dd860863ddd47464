"""Qwen3 0.6B (tied head, q/k norms): LoRA r=16 on all linear layers + the rows of its ChatML tokens.

    python scripts/train.py --config configs/qwen3.py --config.output_dir=runs/qwen3

Conversations are written in ChatML (<|im_start|>role ... <|im_end|>), Qwen's own layout; the rows of its two chat
tokens train beside LoRA (and, the head being tied, their logits with them), as do any untrained rows the data use.
The template is jaxtok's CHATML_TEMPLATE rather than the tokenizer's: Qwen3's own drops the reasoning of earlier
turns, so it renders a conversation differently from its beginning and assistant turns could not be located.
Needs the Hub (or a local copy: --config.model.path=DIR); a GPU or TPU for a reasonable speed.
"""

from jaxtok.data import CHATML_TEMPLATE
from jaxtok.run_config import default_config


def get_config():
    c = default_config()
    c.model.path = "Qwen/Qwen3-0.6B"  # Qwen3ForCausalLM: tied embeddings, vocab 151,936, head_dim 128 (not D/N)
    c.model.dtype = "bfloat16"  # frozen weights in bf16; LoRA and token rows stay float32
    c.data.train = "trl-lib/Capybara"  # multi-turn chats in `messages` format
    c.data.eval = "trl-lib/Capybara"
    c.data.format = "messages"  # loss on assistant turns only
    c.data.chat_template = CHATML_TEMPLATE
    c.tokens.train = ("<|im_start|>", "<|im_end|>")  # the chat tokens
    c.tokens.train_untrained = True  # and any untrained row the data use: found, not listed
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = "all-linear"  # q, k, v, o, gate, up, down; biases and the q/k norms stay frozen
    c.optim.lr = 2e-4
    c.optim.token_lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = 2000
    c.train.batch_size = 8
    c.train.seq_len = 2048
    c.train.eval_every = 250
    c.sample.prompt = "Write a haiku about embeddings."
    c.sample.stop = "<|im_end|>"
    c.output_dir = "runs/qwen3"
    return c
