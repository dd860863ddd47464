"""Qwen2.5 0.5B base (tied head, q/k/v biases): LoRA r=16 on all linear layers + the rows of its ChatML tokens.

    python scripts/train.py --config configs/qwen25.py --config.output_dir=runs/qwen25

The same recipe as configs/qwen3.py for Qwen2.5 (and Qwen2): conversations in ChatML with jaxtok's CHATML_TEMPLATE,
which only appends (the tokenizer's own adds a default system prompt); the rows of <|im_start|> and <|im_end|> train
beside LoRA. The q/k/v biases are frozen like the weights; the sliding window of Qwen2.5 configs is off
(use_sliding_window false), and jaxtok honours it, per layer, when a checkpoint turns it on.
Needs the Hub (or a local copy: --config.model.path=DIR); a GPU or TPU for a reasonable speed.
"""

from jaxtok.data import CHATML_TEMPLATE
from jaxtok.run_config import default_config


def get_config():
    c = default_config()
    c.model.path = "Qwen/Qwen2.5-0.5B"  # Qwen2ForCausalLM: tied embeddings, vocab 151,936; 7B and up are untied
    c.model.dtype = "bfloat16"
    c.data.train = "trl-lib/Capybara"
    c.data.eval = "trl-lib/Capybara"
    c.data.format = "messages"
    c.data.chat_template = CHATML_TEMPLATE
    c.tokens.train = ("<|im_start|>", "<|im_end|>")
    c.tokens.train_untrained = True
    c.tokens.train_head = "all"  # for untied sizes (7B and up): their head rows train too; tied heads ignore it
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = "all-linear"
    c.optim.lr = 2e-4
    c.optim.token_lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = 2000
    c.train.batch_size = 8
    c.train.seq_len = 2048
    c.train.eval_every = 250
    c.sample.prompt = "Write a haiku about embeddings."
    c.sample.stop = "<|im_end|>"
    c.output_dir = "runs/qwen25"
    return c
