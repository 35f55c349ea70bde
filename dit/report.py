"""How the ``dit`` commands print a JSON report."""

from __future__ import annotations

import json
from pathlib import Path


def print_report(report: dict, path: str | None = None) -> None:
    """Print ``report`` as indented JSON, and write it to ``path`` too when given (``--json``)."""
    text = json.dumps(report, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)
