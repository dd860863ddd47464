"""The embedded offline demo: teach a small base model five new special tokens and a calculator tool, on 2 CPU cores.

    python scripts/train.py --config configs/demo.py

The first run builds the base (a small Llama trained on jaxtok/demo_data/pretrain.txt, cached under ~/.cache/jaxtok).
The fine-tuning data are tool-use chats (the assistant calls a calculator, a tool turn brings the result, the
assistant answers with it), rendered with a Llama-3-style template; the template's header and end-of-turn tokens and
the calculator tokens are new to the base, so they are added to the tokenizer and their rows train beside LoRA. The
run prints the eval loss before and after, a sample that runs the calculator call the model makes, the score on 10
held-out questions (runs/demo/heldout.json), and writes runs/demo/adapter (PEFT) and runs/demo/merged (Hugging Face).
"""

from jaxtok.demo import DEMO_BASE, DEMO_CHAT_TEMPLATE, DEMO_TOKEN_DESCRIPTIONS, DEMO_TOKENS, demo_data_path
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
    c.tokens.descriptions = DEMO_TOKEN_DESCRIPTIONS  # e.g. <|calc|> starts as the line break before an expression
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optim.lr = 3e-3
    c.optim.token_lr = 5e-3  # the new rows must move far from where they start
    c.optim.warmup_steps = 10
    c.train.steps = 400
    c.train.batch_size = 8
    c.train.seq_len = 128
    c.train.eval_every = 200
    c.train.save_every = 200
    c.train.log_every = 10
    c.sample.prompt = "What is 23 plus 19?"
    c.sample.stop = "<|eot_id|>"
    c.sample.max_new_tokens = 24  # a call or a one-sentence answer
    c.sample.calculator = True  # run the model's calculator calls and give it the results as tool turns
    c.sample.heldout = str(demo_data_path("chat_eval.jsonl"))  # its first rows: problems never seen in training
    c.output_dir = "runs/demo"
    return c
