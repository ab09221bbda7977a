"""Which torch device a command runs on: one rule for training, inference and rendering."""

import torch

from tvae_em.errors import UsageError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' (first CUDA GPU, else CPU), 'cpu', 'cuda' or 'cuda:N'; under torchrun plain 'cuda' means the
    process's own GPU (``local_rank``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device

