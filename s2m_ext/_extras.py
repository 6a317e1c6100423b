"""Imports of the optional dependencies: the core needs torch and numpy only; the programs
and data readers need the ``train`` extra (``pip install 's2m_ext[train]'``)."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs the package {top!r}, which is not installed: pip install 's2m_ext[{extra}]'"
        ) from exc
