"""``python -m dit.train --config configs/NAME.yaml [key=value ...]`` (also under ``accelerate launch -m``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .checkpointing import CheckpointError, NoSpaceLeft, RunLocked
from .config import ConfigError, load_config
from .data import ShardError
from .loop import Trainer, TrainingDiverged


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and train; a configuration or run-folder error prints one line and returns non-zero."""
    parser = argparse.ArgumentParser(prog="dit train", description="Train a backbone with accelerate.")
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 max_steps=100")
    args = parser.parse_args(argv)
    try:
        Trainer(load_config(args.config, args.overrides)).train()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RunLocked, NoSpaceLeft, CheckpointError, ShardError, TrainingDiverged, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
