"""Which torch device a command runs on, whether it computes in bfloat16, and how many CPU threads it uses: one
rule for training, inference and rendering."""

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tvae_em.config import AMP_MODES
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


# --- CPU threads -------------------------------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")
WORKER_SHARE = 4  # one DataLoader worker process per this many CPUs; below that the loop reads its own batches


@dataclass(frozen=True)
class ThreadPlan:
    """How a command spends the CPUs it may use: torch's threads plus the processes reading batches ahead."""

    cpus: int
    source: str  # where ``cpus`` comes from, for the -v line
    threads: int  # torch intra-op threads of the main process
    workers: int  # DataLoader worker processes (one thread each)

    def describe(self) -> str:
        readers = f" and {self.workers} reading process{'es' if self.workers != 1 else ''}" if self.workers else ""
        return f"{self.cpus} CPUs ({self.source}): {self.threads} torch thread{'s' * (self.threads != 1)}{readers}"


def plan_threads(requested: int | None = None, max_workers: int = 0, environ=None,
                 cgroup_root: Path = CGROUP_ROOT) -> ThreadPlan:
    """The thread plan for ``requested`` CPUs (``--threads``), or else for the CPUs this process may use
    (``cpu_budget``). Workers count in the budget: on a small node (fewer than ``WORKER_SHARE`` CPUs per worker)
    the loop reads batches itself rather than set two reading processes beside two torch threads on two cores
    (a training step at the paper's MNIST configuration through the CLI: 37.6 s with them, 35.5 s without;
    benchmarks/RESULTS.md, "Threads")."""
    if requested is not None and requested < 1:
        raise UsageError(f"--threads must be at least 1, got {requested}")
    cpus, source = (requested, "--threads") if requested else cpu_budget(environ, cgroup_root)
    workers = min(max_workers, cpus // WORKER_SHARE)
    return ThreadPlan(cpus, source, max(1, cpus - workers), workers)


def cpu_budget(environ=None, cgroup_root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """(CPUs, where the number comes from). ``OMP_NUM_THREADS`` is the user's (or torchrun's) explicit choice and
    wins; otherwise the smallest of the CPU affinity mask (taskset, SLURM's cpuset), the cgroup CPU quota (a
    container's --cpus) and ``SLURM_CPUS_PER_TASK``. ``os.cpu_count()`` counts the host's CPUs, which a
    container or a batch job may be far from owning."""
    environ = os.environ if environ is None else environ
    explicit = _positive_int(environ.get("OMP_NUM_THREADS"))
    if explicit:
        return explicit, "OMP_NUM_THREADS"
    limits = {"CPU affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "cgroup CPU quota": cgroup_cpu_quota(cgroup_root),
              "SLURM_CPUS_PER_TASK": _positive_int(environ.get("SLURM_CPUS_PER_TASK"))}
    source, cpus = min(((name, value) for name, value in limits.items() if value), key=lambda item: item[1])
    return cpus, source


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``),
    rounded up; None without a quota or where the files are unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = float(quota), float(period)
    except ValueError:  # 'max': no quota
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to ``count`` for the block, and restored after it (library callers,
    tests among them, keep their own setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _positive_int(text) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None
