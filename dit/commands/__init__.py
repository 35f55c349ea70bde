"""The ``dit`` commands of the package itself, one module each: ``generate`` and ``eval`` (:mod:`dit.cli` lists every
command and says the convention they follow)."""
