"""Seconds per training step through the command line, as a user trains (issue 17).

``tvae-em train`` at the paper's MNIST configuration (50 x 50, P8, 128 fields, kernel 28, padding 8, generator
2 x 512, 1,024 Fourier features, Bernoulli, batches of 100, no validation split, all frequencies at once) on random
images, one epoch of 200 and one of 800 particles, each in a fresh process; the time per step is the difference
of the two wall times over the 6 steps between them, so start-up (imports, escnn's filter bases, the first step's
allocations) cancels. Every extra argument goes to ``tvae-em train`` (e.g. ``--threads 1``); ``--checkout DIR``
times another checkout's code (e.g. the commit before a change) with the same data:

    python benchmarks/cli_train_step.py [--checkout DIR] [-- --threads 1]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tvae_em.io.stack import write_stack

REPO = Path(__file__).resolve().parents[1]
PAPER_MNIST = ["--rotations", "8", "--z-dim", "2", "--encoder-fields", "128", "--encoder-kernel", "28",
               "--encoder-padding", "8", "--generator-width", "512", "--generator-depth", "2",
               "--fourier-features", "1024", "--likelihood", "bernoulli", "--batch-size", "100",
               "--val-fraction", "0", "--coarse-to-fine", "0", "--epochs", "1", "--device", "cpu"]
SIZES = (200, 800)


def wall_seconds(checkout: Path, stack: Path, run_dir: Path, extra: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-m", "tvae_em.cli", "train", str(stack), "-o", str(run_dir), *PAPER_MNIST,
               *extra]
    start = time.perf_counter()
    subprocess.run(command, cwd=checkout, env=env, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose tvae_em is timed")
    parser.add_argument("train_args", nargs="*", help="more 'tvae-em train' options (after --)")
    args = parser.parse_args(argv)
    images = np.random.default_rng(0).uniform(0, 1, (max(SIZES), 50, 50)).astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        seconds = {}
        for n in SIZES:
            stack = Path(work) / f"particles{n}.mrcs"
            write_stack(stack, images[:n], 1.0)
            seconds[n] = wall_seconds(args.checkout.resolve(), stack, Path(work) / f"run{n}", args.train_args)
    steps = (SIZES[1] - SIZES[0]) // 100
    per_step = (seconds[SIZES[1]] - seconds[SIZES[0]]) / steps
    print(f"| {args.checkout} | {' '.join(args.train_args) or '(defaults)'} | {seconds[SIZES[0]]:.0f} | "
          f"{seconds[SIZES[1]]:.0f} | {per_step:.1f} | {100 / per_step:.1f} |")


if __name__ == "__main__":
    main()
