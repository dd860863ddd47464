"""Export a training checkpoint as a PEFT adapter or as a merged Hugging Face checkpoint.

    python scripts/export.py --run OUTPUT_DIR [--step N] --format peft|merged --out DIR [--dtype ...] [--overwrite]

The run's own config (OUTPUT_DIR/run_config.json) rebuilds the model and tokenizer; the checkpoint supplies LoRA and
token rows. The target is written to a temporary directory and renamed into place.

Examples:

    python scripts/export.py --run runs/demo --format merged --out runs/demo/merged-bf16 --dtype bfloat16
    python scripts/export.py --run runs/llama32 --step 1000 --format peft --out runs/llama32/adapter-1000
"""

import argparse
from pathlib import Path

from jaxtok.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run's output_dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--format", required=True, choices=("peft", "merged"))
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--dtype", default=None, help="merged weights: float32 or bfloat16 (default: as trained)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args()

    from jaxtok import trainable
    from jaxtok.atomic import check_target
    from jaxtok.finish import write_adapter, write_merged
    from jaxtok.setup import load_run

    check_target(Path(args.out), args.overwrite)  # fail before the slow part
    config, setup, frozen, state = load_run(args.run, args.step)
    variables = trainable.merge(frozen, state.trainable)  # lora+full trains the embedding and head in params
    if args.format == "peft":
        write_adapter(args.out, setup, variables, config.train.method, overwrite=args.overwrite)
    else:
        dtype = args.dtype or config.export.merged_dtype or config.model.dtype
        write_merged(args.out, setup, variables, dtype, overwrite=args.overwrite)
    print(f"wrote {args.out} (step {int(state.step)})")


if __name__ == "__main__":
    run_main(main)
