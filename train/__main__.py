"""``python -m dit.train --config configs/NAME.yaml [key=value ...]`` (also under ``accelerate launch -m``): the
``dit train`` command (:mod:`dit.train.command`)."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
