"""The main job: fine-tune a Llama with LoRA + trainable token rows from a config file.

    python scripts/train.py --config=FILE [--config.KEY=VALUE ...]

Every key is documented in jaxtok/run_config.py. Run the same command again to resume from the latest checkpoint.

Examples:

    python scripts/train.py --config configs/demo.py
    python scripts/train.py --config configs/llama32.py --config.lora.rank=8 --config.output_dir=runs/r8
"""

import sys

from jaxtok.cli import parse_config, run_main


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):  # absl's flag parser has no --help of its own here
        print(f"usage: train.py --config=FILE [--config.KEY=VALUE ...]\n\n{__doc__.strip()}")
        return
    config = parse_config(sys.argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from jaxtok.train import run

    run(config)


if __name__ == "__main__":
    run_main(main)
