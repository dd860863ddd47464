"""Talk to a model: stream the continuation of a prompt, or chat with it turn by turn.

    python scripts/generate.py --model DIR_OR_HUB_ID [--adapter DIR | --run OUTPUT_DIR] (--prompt TEXT | --chat)
                               [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]
                               [--dtype float32|bfloat16] [--chat-template FILE] [--json]

The model is a Hugging Face checkpoint (--model, e.g. a run's merged/ export), a base with a PEFT adapter (--model
BASE --adapter DIR; from jaxtok or PyTorch, with its own tokenizer when it added tokens), or the latest checkpoint
of a run (--run OUTPUT_DIR, on the base its config names unless --model names another copy).

Text appears as it is generated. Generation stops at EOS, at the chat template's end-of-turn token, or after
--max-new-tokens. --prompt continues plain text; --chat reads one user message per line, renders the conversation
with the tokenizer's chat template (or --chat-template FILE, or the run's data.chat_template) and answers; Ctrl-D
ends it. Temperature 0 (the default) is greedy decoding. --json adds, after each reply, a line
{"text": the reply without its stop token, "token_ids": every new token, the stop token included}.

Examples:

    python scripts/generate.py --model runs/demo/merged --chat
    python scripts/generate.py --run runs/demo --chat --temperature 0.7 --seed 1
    python scripts/generate.py --model jaxtok:demo-base --adapter runs/demo/adapter --prompt "Add 16 and 48." --json
    echo "What is 23 plus 19?" | python scripts/generate.py --model runs/demo/merged --chat --json
"""

import argparse
import json
import sys

from jaxtok.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF checkpoint directory or Hub id (with --run: the base)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--adapter", default=None, help="a PEFT adapter directory (from jaxtok or PyTorch) to apply")
    source.add_argument("--run", default=None, help="a training run's output_dir: its latest checkpoint")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", default=None, help="text to continue")
    mode.add_argument("--chat", action="store_true", help="chat: one user message per line of input, Ctrl-D ends")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per reply (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--seed", type=int, default=0, help="of sampling")
    parser.add_argument("--dtype", default="float32", help="dtype of weights and compute: float32 or bfloat16")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template file, replacing the tokenizer's")
    parser.add_argument("--json", action="store_true", help='after each reply, a line {"text": ..., "token_ids": ...}')
    args = parser.parse_args()

    from jaxtok import talk
    from jaxtok.generate import check_sampling

    check_sampling(args.temperature, 0, args.top_p, args.max_new_tokens)
    template = talk.read_template(args.chat_template) if args.chat_template else None
    talker = talk.load(args.model, args.adapter, args.run, args.dtype, template)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)

    def answer(prompt_ids) -> str:
        ids, text = talker.say(prompt_ids, write, **settings)
        print(flush=True)
        if args.json:
            print(json.dumps({"text": text, "token_ids": ids}, ensure_ascii=False), flush=True)
        return text

    if args.prompt is not None:
        answer(talker.text_prompt(args.prompt))
        return
    talker.require_template()  # before the first message, not after it
    interactive = sys.stdin.isatty()
    messages = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # the shell's prompt on a line of its own
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": answer(talker.chat_prompt(messages)).strip()})


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
