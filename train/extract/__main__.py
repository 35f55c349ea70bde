"""``python -m dit.train.extract DATA --pipeline P --out D`` (also under ``accelerate launch -m``): the ``dit extract``
command (:mod:`dit.train.extract.command`)."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
