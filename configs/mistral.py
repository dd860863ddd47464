"""Mistral 7B v0.3 base (untied head): LoRA r=16 on all linear layers + the rows of its instruction tokens.

    python scripts/train.py --config configs/mistral.py --config.output_dir=runs/mistral

Conversations in Mistral's instruction layout (<s>[INST] ... [/INST] reply</s>) with jaxtok's MISTRAL_TEMPLATE, which
only appends; the control tokens [INST] and [/INST] of the v0.3 vocabulary train as rows in the embedding and, the
head being untied, in the head too. Mistral 7B v0.1 sets sliding_window=4096: jaxtok then masks every layer to it,
as transformers does (v0.3 attends to the whole sequence).
7B needs an accelerator with ~40 GB for bf16 weights and activations at this sequence length, or a mesh.
"""

from jaxtok.data import MISTRAL_TEMPLATE
from jaxtok.run_config import default_config


def get_config():
    c = default_config()
    c.model.path = "mistralai/Mistral-7B-v0.3"  # MistralForCausalLM: untied head, vocab 32,768
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # 32 layers: recompute activations to fit
    c.data.train = "trl-lib/Capybara"
    c.data.eval = "trl-lib/Capybara"
    c.data.format = "messages"
    c.data.chat_template = MISTRAL_TEMPLATE
    c.tokens.train = ("[INST]", "[/INST]")
    c.tokens.train_untrained = True  # and any untrained row the data use: found, not listed
    c.tokens.train_head = "all"  # the untied head's rows of these tokens train as well
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
    c.sample.stop = "</s>"
    c.output_dir = "runs/mistral"
    return c
