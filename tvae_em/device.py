"""Which torch device a command runs on, and whether it computes in bfloat16: one rule for training, inference
and rendering."""

import functools

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


AMP_MODES = ("auto", "bf16", "off")


def bf16_autocast_enabled(amp: str, device: torch.device) -> bool:
    """bfloat16 autocast: always with 'bf16', never with 'off'; with 'auto' on CUDA and on CPUs with AMX-BF16
    matrix units, where it trains the paper's MNIST model ~2x faster than float32 with the same ELBO curve and
    encodes ~2x faster with nearly the same poses (benchmarks/RESULTS.md, "Throughput"; other CPUs keep float32:
    their bfloat16 speed is unmeasured)."""
    if amp not in AMP_MODES:
        raise UsageError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_amx_bf16())
    return amp == "bf16"


def bf16_autocast(device: torch.device, enabled: bool):
    """The autocast context of every bfloat16 path (training, inference, benchmarks); a no-op when disabled."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether the CPU advertises AMX-BF16 (Linux /proc/cpuinfo flag ``amx_bf16``; False where unreadable)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in handle)
    except OSError:
        return False
