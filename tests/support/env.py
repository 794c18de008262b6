"""The environment for subprocesses that run this checkout's package (``python -m blackmamba ...``)."""

import os
from pathlib import Path

import blackmamba

SRC = Path(blackmamba.__file__).resolve().parents[1]


def checkout_env(**extra: str) -> dict:
    """os.environ with this checkout's ``src`` first on PYTHONPATH, and ``extra`` variables."""
    return {**os.environ, "PYTHONPATH": str(SRC), **extra}
