"""List the untrained rows of a checkpoint: the tokens whose embedding (or untied head) row pretraining never trained.

    python scripts/inspect_tokens.py --model DIR_OR_HUB_ID [--allow-pickle]

A row is untrained when its L2 norm is 0 or at most 0.001 times the median row norm of its matrix (jaxtok/untrained.py
explains why). These are the rows `tokens.train_untrained=True` trains when the training data use their tokens. Only
the embedding and the head are read, never the whole model. One line per untrained token: its id, the token, and its
rows' norms relative to the median (the head's only when it is not tied to the embedding).

Examples:

    python scripts/inspect_tokens.py --model jaxtok:demo-base
    python scripts/inspect_tokens.py --model meta-llama/Llama-3.2-1B
"""

import argparse

from jaxtok.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint directory or Hub id")
    parser.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (can run code)")
    args = parser.parse_args()

    import numpy as np

    from jaxtok.demo import resolve_model_path
    from jaxtok.errors import JaxtokError
    from jaxtok.tokenizer import load_tokenizer
    from jaxtok.untrained import RATIO, read_untrained

    model_path = resolve_model_path(args.model)
    found = read_untrained(model_path, args.allow_pickle)
    try:
        tokenizer = load_tokenizer(model_path)
    except JaxtokError:  # the weights alone can still be inspected
        tokenizer = None
    tied = found.head_norms is None
    vocab = len(found.embed_norms)

    def name(i: int) -> str:
        token = tokenizer.convert_ids_to_tokens(int(i)) if tokenizer is not None and i < len(tokenizer) else None
        return repr(token) if token is not None else "-"

    print(f"{args.model}: {len(found.ids)} of {vocab} tokens have untrained rows (norm <= {RATIO:g} x the median "
          f"row norm): embedding {len(found.embed_ids)}, head {'tied' if tied else len(found.head_ids)}")
    for matrix, norms in (("embedding", found.embed_norms), ("head", found.head_norms)):
        if norms is not None:
            i = int(np.argmin(norms))
            print(f"smallest {matrix} row: {norms[i]:.3g} x the median (id {i} {name(i)})")
    if not found.ids:
        return
    print(f"{'id':>8}  {'token':<32}  {'embedding':>9}" + ("" if tied else f"  {'head':>9}"))
    for i in found.ids:
        line = f"{i:>8}  {name(i):<32}  {found.embed_norms[i]:>9.2e}"
        print(line + ("" if tied else f"  {found.head_norms[i]:>9.2e}"))


if __name__ == "__main__":
    run_main(main)
