"""The GPU check in one run (issue 17): the GPU-marked tests, the throughput of the paper's MNIST configuration
and one epoch of MNIST(U) P8 with the paper's model, summed up in one table with the targets.

Meant for a lent CUDA machine with PyTorch installed and the other packages carried as wheels
(``benchmarks/gpu_check.sh --prepare-wheels``), in under 8 minutes; ``--device cpu --quick`` runs every step
on a tiny configuration so that the script is tested where no GPU is (tests/test_gpu_check.py):

    benchmarks/gpu_check.sh [--device cuda] [--mnist DIR] [--batch 1000]
    benchmarks/gpu_check.sh --device cpu --quick
"""

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mnist_tables
import throughput
import torch

from tvae_em.checkpoint import load_model
from tvae_em.io.stack import ArrayParticles
from tvae_em.train import train

REPO = Path(__file__).resolve().parents[1]
# issue 17's targets on an H100-class GPU, at the paper's configuration
TARGETS = {"train_ips": 20_000, "infer_ips": 50_000}
# the model as the paper describes it, and with the authors' code's cheaper layers (rotation-shared 1x1 layers in
# the encoder, one phase-shifted cosine per Fourier feature)
VARIANTS = {"": {}, ", shared 1x1, cos + phase": dict(encoder_pointwise="shared", fourier_random_phase=True)}
TINY = dict(image_size=24, rotations=4, z_dim=2, encoder_fields=4, encoder_kernel=13, encoder_padding=2,
            generator_width=32, generator_depth=2, fourier_features=32, likelihood="bernoulli")


def run_tests(device: str) -> dict:
    """The tests marked ``gpu``, on ``device`` (TVAE_TEST_DEVICE); their last summary line."""
    start = time.perf_counter()
    env = {**os.environ, "TVAE_TEST_DEVICE": device}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           str(REPO / "tests")], cwd=REPO, env=env, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(lines[-15:]), file=sys.stderr)
    summary = lines[-1].strip("= ") if lines else "no output"
    return {"check": "GPU-marked tests", "result": summary, "target": "all pass",
            "met": done.returncode == 0 and "skipped" not in summary, "seconds": time.perf_counter() - start}


def run_throughput(device: str, config_name: str, batch: int, quick: bool) -> list[dict]:
    """Training and inference images per second of the fast path (fresh processes, throughput.measure), for each
    of the ``VARIANTS``."""
    rows = []
    for (variant, options), kind in itertools.product(VARIANTS.items(), ("train", "infer")):
        start = time.perf_counter()
        job = throughput.Job({**throughput.CONFIGS[config_name], **options}, "fast", kind, device, batch, warmup=1,
                             steps=1 if quick else 5)
        result = throughput.run_in_fresh_process(job)
        ips = batch / result["seconds"]
        memory = result.get("peak_gpu_gib", result["peak_rss_gib"])
        target = TARGETS[f"{kind}_ips"]
        rows.append({"check": f"{kind} img/s, {config_name}{variant}, batch {batch}",
                     "result": f"{ips:,.0f} img/s, peak {memory:.1f} GiB", "target": f">= {target:,} img/s",
                     "met": ips >= target, "seconds": time.perf_counter() - start})
    return rows


def run_mnist_epoch(device: str, mnist_dir: Path, quick: bool) -> dict:
    """One epoch of MNIST(U) P8 z_dim 2 (the paper's model and recipe, or the tiny budget with --quick), scored
    as benchmarks/mnist_tables.py scores its cells."""
    start = time.perf_counter()
    budget = dataclasses.replace(mnist_tables.BUDGETS["tiny" if quick else "gpu"], epochs=1)
    digits, _ = mnist_tables.load_digits(mnist_dir, budget)
    data = mnist_tables.make_variant(digits, "U")
    config = mnist_tables.target_config(budget, 8, 2, "U")
    with tempfile.TemporaryDirectory() as run_dir:
        train(config, budget.train_config(device=device, num_workers=0, progress=False),
              ArrayParticles(data["train"]), Path(run_dir))
        model, _ = load_model(run_dir)
    model.encoder.export()
    scores = mnist_tables.score(model, data["test"])
    return {"check": f"1 epoch MNIST(U) P8 z2, {len(data['train'])} digits ({'tiny' if quick else 'paper'} model)",
            "result": f"rotation r {scores['rotation']:.3f}, Ward {100 * scores['ward_accuracy']:.1f} %",
            "target": "runs; scores for the record", "met": True, "seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    lines = ["| check | result | target | met | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {row['check']} | {row['result']} | {row['target']} | {'yes' if row['met'] else 'no'} | "
              f"{row['seconds']:.0f} |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny configurations: checks the script, not speed")
    parser.add_argument("--mnist", type=Path, default=mnist_tables.SHARED_MNIST, help="folder of the MNIST IDX files")
    parser.add_argument("--batch", type=int, default=1000, help="batch of the throughput measurements")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA GPU is visible to torch {torch.__version__}", file=sys.stderr)
        return 2
    if args.quick:
        throughput.CONFIGS["tiny"] = TINY
    start = time.perf_counter()
    config_name, batch = ("tiny", 8) if args.quick else ("mnist", args.batch)
    rows = [*attempt("GPU-marked tests", run_tests, args.device),
            *attempt("throughput", run_throughput, args.device, config_name, batch, args.quick),
            *attempt("1 epoch MNIST(U) P8", run_mnist_epoch, args.device, args.mnist, args.quick)]
    machine = throughput.machine_line(torch.device(args.device))
    print(f"**{args.device}**: {machine}; {time.perf_counter() - start:.0f} s in all"
          f"{' (--quick: tiny configurations, speeds not comparable)' if args.quick else ''}\n")
    print(table(rows))
    # the speed targets are for the table; the exit status says whether every step ran and the tests passed
    return 0 if rows[0]["met"] and not any(row["result"].startswith("failed") for row in rows) else 1


def attempt(check: str, step, *args) -> list[dict]:
    """The step's rows, or one row saying how it failed, so that one broken step does not hide the others."""
    start = time.perf_counter()
    try:
        rows = step(*args)
    except Exception as error:  # noqa: BLE001 - any failure is reported in the table, with its type
        return [{"check": check, "result": f"failed: {type(error).__name__}: {error}", "target": "runs",
                 "met": False, "seconds": time.perf_counter() - start}]
    return rows if isinstance(rows, list) else [rows]


if __name__ == "__main__":
    sys.exit(main())
