"""The embedded offline demo: teach a small base model five new special tokens, on 2 CPU cores in a few minutes.

    python scripts/train.py --config configs/demo.py

The first run builds the base (a small Llama trained on jaxtok/demo_data/pretrain.txt, cached under ~/.cache/jaxtok).
The fine-tuning data are chats in which the assistant calls a calculator, rendered with a Llama-3-style template;
the template's header and end-of-turn tokens and the calculator tokens are new to the base, so they are added to the
tokenizer and their rows train beside LoRA. The run prints the eval loss before and after, a sample answer that uses
the new tokens, and writes runs/demo/adapter (PEFT) and runs/demo/merged (Hugging Face).
"""

from jaxtok.demo import DEMO_BASE, DEMO_CHAT_TEMPLATE, DEMO_TOKENS, demo_data_path
from jaxtok.run_config import default_config


def get_config():
    c = default_config()
    c.model.path = DEMO_BASE  # built from shipped data on first use, then cached
    c.model.dtype = "float32"  # CPU: float32 is as fast as bfloat16 and exact
    c.data.train = str(demo_data_path("chat_train.jsonl"))
    c.data.eval = str(demo_data_path("chat_eval.jsonl"))
    c.data.format = "messages"  # loss on the assistant turns only
    c.data.chat_template = DEMO_CHAT_TEMPLATE  # Llama-3 style; the base has no template of its own
    c.tokens.add = DEMO_TOKENS  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>, <|calc|>, <|/calc|>
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optim.lr = 2e-3
    c.optim.token_lr = 5e-3  # new rows start at the mean embedding and must move far
    c.optim.warmup_steps = 10
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.seq_len = 128
    c.train.eval_every = 50
    c.train.save_every = 50
    c.train.log_every = 10
    c.sample.prompt = "What is 23 plus 19?"
    c.sample.stop = "<|eot_id|>"
    c.output_dir = "runs/demo"
    return c
