"""Llama 3.2 1B base (tied head): LoRA r=16 on all linear layers + the chat-template tokens Llama 3 base ships
untrained.

    python scripts/train.py --config configs/llama32.py --config.output_dir=runs/llama32

The base model's rows for <|start_header_id|>, <|end_header_id|> and <|eot_id|> were never trained, so LoRA alone
cannot learn the chat format; here those three rows train (and, the head being tied, their logits with them).
Needs the Hub (or a local copy: --config.model.path=DIR) and a GPU or TPU for a reasonable speed.
"""

from jaxtok.data import DEFAULT_CHAT_TEMPLATE
from jaxtok.run_config import default_config


def get_config():
    c = default_config()
    c.model.path = "meta-llama/Llama-3.2-1B"  # base model: tied embeddings, vocab 128,256
    c.model.dtype = "bfloat16"  # frozen weights in bf16; LoRA and token rows stay float32
    c.data.train = "trl-lib/Capybara"  # multi-turn chats in `messages` format
    c.data.eval = "trl-lib/Capybara"
    c.data.format = "messages"  # loss on assistant turns only
    c.data.chat_template = DEFAULT_CHAT_TEMPLATE  # the base tokenizer has no chat template
    c.tokens.train = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")  # untrained in the base
    c.tokens.train_untrained = True  # and any other untrained row the data use (reserved tokens): found, not listed
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = "all-linear"
    c.optim.lr = 2e-4
    c.optim.token_lr = 1e-3  # rows start far from useful values: a higher rate than LoRA's
    c.optim.warmup_steps = 50
    c.train.steps = 2000
    c.train.batch_size = 8
    c.train.seq_len = 2048
    c.train.eval_every = 250
    c.sample.prompt = "Write a haiku about embeddings."
    c.sample.stop = "<|eot_id|>"
    c.output_dir = "runs/llama32"
    return c
