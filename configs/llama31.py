"""Llama 3.1 8B base (untied head): LoRA r=16 on all linear layers + the untrained chat-template token rows.

    python scripts/train.py --config configs/llama31.py --config.output_dir=runs/llama31

With an untied head the head rows of those tokens are untrained too, so tokens.train_head="all" trains both tables.
8B needs an accelerator with ~40 GB for bf16 weights and activations at this sequence length, or a mesh.
"""

from jaxtok.data import DEFAULT_CHAT_TEMPLATE
from jaxtok.run_config import default_config


def get_config():
    c = default_config()
    c.model.path = "meta-llama/Llama-3.1-8B"  # untied head, vocab 128,256
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # 32 layers: recompute activations to fit
    c.data.train = "trl-lib/Capybara"
    c.data.eval = "trl-lib/Capybara"
    c.data.format = "messages"
    c.data.chat_template = DEFAULT_CHAT_TEMPLATE
    c.tokens.train = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    c.tokens.train_untrained = True  # and any other untrained row the data use (reserved tokens): found, not listed
    c.tokens.train_head = "all"  # the untied head's rows of these tokens are untrained as well
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optim.lr = 1e-4
    c.optim.token_lr = 5e-4
    c.optim.warmup_steps = 50
    c.train.steps = 2000
    c.train.batch_size = 4
    c.train.grad_accum = 4
    c.train.seq_len = 2048
    c.train.eval_every = 250
    c.sample.prompt = "Write a haiku about embeddings."
    c.sample.stop = "<|eot_id|>"
    c.output_dir = "runs/llama31"
    return c
