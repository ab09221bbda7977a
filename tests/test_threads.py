"""How many CPU threads a command uses: the budget from the environment, the split between torch's threads and
the processes reading data, and that training and encoding really run with it (and give it back)."""

import os

import numpy as np
import pytest
import torch

from tvae_em import checkpoint as ckpt
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.device import cgroup_cpu_quota, cpu_budget, plan_threads
from tvae_em.encode import encode_particles
from tvae_em.errors import UsageError
from tvae_em.io.stack import ArrayParticles
from tvae_em.train import train

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(tmp_path, v2=None, v1=None):
    """A fake /sys/fs/cgroup: v2 'cpu.max' text, or v1 (quota, period) in cpu/."""
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


@pytest.mark.parametrize(("v2", "v1", "cpus"), [
    ("150000 100000", None, 2),  # docker --cpus 1.5: rounded up
    ("max 100000", None, None),  # no quota
    (None, (400000, 100000), 4),
    (None, (-1, 100000), None),
    (None, None, None),  # no cgroup files at all
    ("garbage", None, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, v2, v1, cpus):
    assert cgroup_cpu_quota(cgroup(tmp_path, v2, v1)) == cpus


def test_budget_takes_the_smallest_limit_and_says_which(tmp_path):
    (tmp_path / "none").mkdir()
    no_quota = cgroup(tmp_path / "none")
    assert cpu_budget({}, no_quota) == (AFFINITY, "CPU affinity")
    assert cpu_budget({"SLURM_CPUS_PER_TASK": "1"}, no_quota) == (1, "SLURM_CPUS_PER_TASK")
    assert cpu_budget({"SLURM_CPUS_PER_TASK": str(AFFINITY + 5)}, no_quota) == (AFFINITY, "CPU affinity")
    (tmp_path / "quota").mkdir()
    quota = cgroup(tmp_path / "quota", v2="100000 100000")
    assert cpu_budget({}, quota) == (1, "cgroup CPU quota")
    # OMP_NUM_THREADS is an explicit choice (the user's, or torchrun's): it wins, even above the other limits
    assert cpu_budget({"OMP_NUM_THREADS": "6", "SLURM_CPUS_PER_TASK": "1"}, quota) == (6, "OMP_NUM_THREADS")
    assert cpu_budget({"OMP_NUM_THREADS": "zero", "SLURM_CPUS_PER_TASK": "1"}, quota)[0] == 1


@pytest.mark.parametrize(("cpus", "max_workers", "threads", "workers"), [
    (1, 2, 1, 0), (2, 2, 2, 0), (3, 2, 3, 0),  # small nodes: no reading process beside torch's threads
    (4, 2, 3, 1), (16, 2, 14, 2), (64, 2, 62, 2), (16, 0, 16, 0),
])
def test_workers_count_in_the_budget(cpus, max_workers, threads, workers):
    plan = plan_threads(cpus, max_workers)
    assert (plan.threads, plan.workers) == (threads, workers)
    assert plan.threads + plan.workers == cpus
    assert "--threads" in plan.describe()


def test_threads_below_one_are_refused():
    with pytest.raises(UsageError, match="--threads"):
        plan_threads(0)
    with pytest.raises(UsageError, match="threads"):
        TrainConfig(threads=0)


class ThreadProbe(ArrayParticles):
    """Particles that note torch's thread count whenever they are read (in the main process: no workers)."""

    def __init__(self, n=24, size=16):
        super().__init__(np.random.default_rng(0).uniform(0, 1, (n, size, size)))
        self.seen = set()

    def read(self, indices):
        self.seen.add(torch.get_num_threads())
        return super().read(indices)


SMALL = dict(image_size=16, rotations=4, encoder_fields=2, generator_width=8, generator_depth=1, fourier_features=8,
             likelihood="bernoulli")


def test_training_and_encoding_run_with_the_threads_asked_for_and_restore_them(tmp_path):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    particles = ThreadProbe()
    config = TrainConfig(batch_size=8, epochs=1, val_fraction=0.25, threads=other, progress=False)
    train(ModelConfig(**SMALL), config, particles, tmp_path / "run")
    # the training reads (and the normalisation check before them) ran with 'other' threads and no worker
    # process, since a budget this small gets none
    assert particles.seen == {other}
    assert torch.get_num_threads() == before

    model, _ = ckpt.load_model(tmp_path / "run")
    threads_seen, encode = [], model.encode
    model.encode = lambda images: (threads_seen.append(torch.get_num_threads()), encode(images))[1]
    encode_particles(model, particles, batch_size=8, device="cpu", threads=other)
    assert set(threads_seen) == {other} and len(threads_seen) == 3
    assert torch.get_num_threads() == before
