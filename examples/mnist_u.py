"""MNIST(U) through the command line, as in section 4.2 of the paper.

    python examples/mnist_u.py MNIST_DIR OUT_DIR [--digits 3000] [--epochs 6]

MNIST_DIR holds the MNIST IDX files (t10k-* and, if you have them, train-*). The script writes the rotated
and shifted digits as RELION files, then runs `tvae-em train`, `pose` and `embed` on them with the settings of
the paper's small MNIST model (Bernoulli likelihood, P8, z_dim 2) and prints the commands it runs.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from tvae_em.simulate import write_mnist_variant


def run(*args):
    command = [sys.executable, "-m", "tvae_em.cli", *map(str, args)]
    print("+ tvae-em", *command[3:], file=sys.stderr)
    subprocess.run(command, check=True)


def main():
    parser = argparse.ArgumentParser(description="MNIST(U) through tvae-em")
    parser.add_argument("mnist_dir")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--digits", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    train_star = write_mnist_variant(args.mnist_dir, args.out_dir / "data", "U", n=args.digits, split="train")
    test_star = write_mnist_variant(args.mnist_dir, args.out_dir / "data", "U", split="test")
    run("train", train_star, "-o", args.out_dir / "run", "--likelihood", "bernoulli", "--rotations", 8,
        "--z-dim", 2, "--encoder-fields", 32, "--generator-width", 256, "--generator-depth", 3,
        "--fourier-features", 128, "--fourier-scale", 2.0, "--lr", 1e-3, "--epochs", args.epochs)
    run("pose", args.out_dir / "run", test_star, "-o", args.out_dir / "test_posed.star")
    run("embed", args.out_dir / "run", test_star, "-o", args.out_dir / "test_embedded.star", "--clusters", 10)


if __name__ == "__main__":
    main()
