"""The torch device a model runs or trains on."""

from __future__ import annotations

import torch

from edgelm.errors import EdgelmError


def resolve_device(device: str) -> str:
    """ "auto" → cuda, then mps, then cpu; a named device that is absent is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise EdgelmError(
            "device cuda requested but this torch has no CUDA device "
            "(install a CUDA build of torch, or use --device cpu)"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise EdgelmError("device mps requested but MPS is not available (Apple silicon with macOS 12.3+)")
    if kind not in ("cpu", "cuda", "mps"):
        raise EdgelmError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device
