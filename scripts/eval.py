"""Evaluation loss of a Llama checkpoint on a JSON-lines file of {"text": ...} rows.

    python scripts/eval.py --model DIR_OR_HUB_ID --data FILE.jsonl --seq-len 512 [--dtype float32|bfloat16]
                           [--adapter PEFT_ADAPTER_DIR]

The last line printed is one JSON object: {"eval_loss": mean next-token cross-entropy over all predicted tokens,
"tokens": how many tokens were predicted}.

Examples:

    python scripts/eval.py --model runs/demo/merged --data held_out.jsonl --seq-len 128
    python scripts/eval.py --model meta-llama/Llama-3.2-1B --adapter runs/llama32/adapter --data held_out.jsonl \\
                           --seq-len 2048 --dtype bfloat16
"""

import argparse
import json

from jaxtok.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint directory or Hub id")
    parser.add_argument("--data", required=True, help='JSON-lines file of {"text": ...} rows')
    parser.add_argument("--seq-len", type=int, required=True, help="rows are cut to this many tokens")
    parser.add_argument("--dtype", default="float32", help="dtype of weights and compute: float32 or bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--adapter", default=None, help="a PEFT adapter directory (from jaxtok or PyTorch) to apply")
    parser.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (can run code)")
    args = parser.parse_args()

    from jaxtok.convert import load_pretrained
    from jaxtok.demo import resolve_model_path
    from jaxtok.errors import JaxtokError
    from jaxtok.evaluate import evaluate, read_text_rows, tokenize_texts
    from jaxtok.peft_import import apply_adapter
    from jaxtok.tokenizer import load_tokenizer

    if args.seq_len < 2:
        raise JaxtokError(f"--seq-len must be at least 2 (got {args.seq_len}): a loss needs two tokens")
    if args.batch_size < 1:
        raise JaxtokError(f"--batch-size must be positive (got {args.batch_size})")
    texts = read_text_rows(args.data)
    model_path = resolve_model_path(args.model)
    model, params = load_pretrained(model_path, dtype=args.dtype, allow_pickle=args.allow_pickle)
    tokenizer, adapters = load_tokenizer(model_path), {}
    if args.adapter:
        model, params, adapters, tokenizer = apply_adapter(args.adapter, model, params, tokenizer)
    rows = tokenize_texts(tokenizer, texts, args.seq_len)
    result = evaluate(model, {"params": params, **adapters}, rows, args.seq_len, args.batch_size)
    print(json.dumps({"eval_loss": result["eval_loss"], "tokens": result["tokens"]}))


if __name__ == "__main__":
    run_main(main)
