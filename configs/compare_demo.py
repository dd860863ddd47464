"""The token-training study on the offline demo: which method teaches a model new tokens, at what cost, and whether
jaxtok and PEFT agree, on 2 CPU cores in a few minutes.

    python scripts/compare.py --config configs/compare_demo.py --out runs/compare

The demo's base, chats and new tokens (configs/demo.py): five chat-template and calculator tokens that the base has
never seen. Each method trains 100 steps from the same start on the same batches, in float32 and without dropout,
so the two frameworks' losses can be compared step by step.
"""

from jaxtok.demo import DEMO_BASE, DEMO_CHAT_TEMPLATE, DEMO_TOKEN_DESCRIPTIONS, DEMO_TOKENS, demo_data_path
from jaxtok.run_config import default_config


def get_config():
    c = default_config()
    c.model.path = DEMO_BASE  # built from shipped data on first use, then cached
    c.model.dtype = "float32"
    c.data.train = str(demo_data_path("chat_train.jsonl"))
    c.data.eval = str(demo_data_path("chat_eval.jsonl"))
    c.data.format = "messages"  # loss on the assistant turns only
    c.data.chat_template = DEMO_CHAT_TEMPLATE
    c.tokens.add = DEMO_TOKENS  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>, <|calc|>, <|/calc|>
    c.tokens.descriptions = DEMO_TOKEN_DESCRIPTIONS
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.0  # dropout masks differ between frameworks
    c.optim.lr = 3e-3
    c.optim.token_lr = 5e-3
    c.optim.warmup_steps = 10
    c.train.method = "lora+rows"  # compare.py sets each method in turn
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.seq_len = 128
    c.train.eval_every = 25
    c.output_dir = "runs/compare"
    return c
