"""Where the package keeps its shipped MicroShapes models (the default of ``dit generate``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_model() -> Path:
    """The MicroShapes pipeline shipped inside the package."""
    return Path(str(resources.files("dit") / "assets" / "microshapes"))


def default_lcm() -> Path:
    """The LCM student shipped beside the default model (``dit generate --lcm``)."""
    return Path(str(resources.files("dit") / "assets" / "microshapes_lcm"))
