"""Checkpoints of s2m-train: what they hold, how they are written and read back.

A checkpoint is a ``torch.save`` dict with ``format == FORMAT``; it holds the model
description (enough to rebuild it with :func:`~s2m_ext.nn.build_model`), its weights, the
data description, the optimizer state, the completed step count, the RNG states and the
training history. Files are written atomically (temporary file, then rename), so a run
killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from .model import ConceptModel, model_from_spec

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint"]

FORMAT = "s2m_ext.set2model-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable s2m_ext checkpoint."""


def save_checkpoint(path, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` (stamped with FORMAT and VERSION) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Read an s2m_ext checkpoint; a missing file, a file torch cannot read, or a file of
    another kind raises :class:`CheckpointError` (FileNotFoundError for a missing path)
    naming the path and what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass a .pt file written by s2m-train (e.g. {path}/last.pt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or broken files
        raise CheckpointError(f"{str(path)!r} is not a checkpoint torch can read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        kind = f"a dict with keys {sorted(payload)[:6]}" if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{str(path)!r} is not an s2m_ext Set2Model checkpoint (it holds {kind}); pass a file written by s2m-train")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {payload.get('version')}, this s2m_ext reads version {VERSION}")
    return payload


def model_from_checkpoint(payload: Dict[str, Any]) -> ConceptModel:
    """Rebuild the model a checkpoint describes and load its weights (strictly: a weight
    that is missing, unexpected or of another shape raises CheckpointError)."""
    spec = payload.get("model")
    if not isinstance(spec, dict) or "scorer" not in spec or "embedding" not in spec:
        raise CheckpointError("the checkpoint has no model description ('model' with 'scorer' and 'embedding')")
    try:
        model = model_from_spec(spec)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint describes a model this s2m_ext cannot build: {exc}") from exc
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint has no model weights ('state_dict')")
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = model.to(dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit the model it describes: {exc}") from exc
    return model
