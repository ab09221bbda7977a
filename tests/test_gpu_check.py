"""benchmarks/gpu_check.sh runs end to end on the CPU (tiny configurations), so it works the day a GPU is lent."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(mnist_dir):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick", "--mnist",
                           str(mnist_dir)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = done.stdout.splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 6, done.stdout  # tests, training and inference of two variants, one epoch
    assert "passed" in rows[0] and "failed" not in rows[0]
    assert all("failed:" not in row for row in rows), done.stdout
    assert "shared 1x1" in rows[3] and "rotation r" in rows[5]
