"""``python -m dit.train --config configs/NAME.yaml [key=value ...]`` (also under ``accelerate launch -m``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from .config import load_config
    from .loop import Trainer

    parser = argparse.ArgumentParser(prog="dit train", description="Train a backbone with accelerate.")
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 max_steps=100")
    args = parser.parse_args(argv)
    Trainer(load_config(args.config, args.overrides)).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
