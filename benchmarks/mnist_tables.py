"""The paper's Tables 1 and 2 (section 4.2-4.3) reproduced with tvae-em's own model, training and metrics.

Grid: TARGET-VAE P4, P8, P16 x z_dim 2, 32 x MNIST(N), MNIST(U) (rotation prior 'normal' for N, 'uniform'
for U, translation prior N(0, 5^2) px, Bernoulli pixels in [0, 1]), plus the plain VAE and beta-VAE (z_dim 4,
beta 4) sized to the TARGET-VAE P8 z_dim 2 model of the preset, and a spatial-VAE-like model that falls out
of TARGET-VAE's options (one rotation, one translation cell covering the whole image, continuous shift).

Protocol on held-out digits (``model.encode``):
- rotation: circular correlation of the true angle with (prediction on the posed digit - prediction on the
  same digit centred and unrotated), the paper's protocol (``metrics.rotation_correlation``);
- translation: Pearson r of true and predicted t per axis, raw and corrected by the prediction on the centred
  digit (``metrics.relative_pose``);
- clustering: most probable z, Ward into 10 clusters, Hungarian accuracy (the paper's), and k-means accuracy
  and NMI for reference.

Each cell keeps its run and ``scores.json`` in ``--workdir/<budget>/<cell>``; a cell already scored is not
retrained (``--rerun`` forces it), an interrupted training is resumed, and the tables list every cell scored
so far for the budget, so cells can be run one at a time (``--report-only`` just tabulates them):

    python benchmarks/mnist_tables.py --budget cpu --groups 8 --z-dims 2 --variants U --results
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tvae_em.checkpoint import load_model
from tvae_em.clustering import cluster
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.io.atomic import atomic_path
from tvae_em.io.mnist import has_mnist, mnist_split
from tvae_em.io.stack import ArrayParticles
from tvae_em.metrics import (
    clustering_accuracy,
    nmi,
    relative_pose,
    rotation_correlation,
    translation_correlation,
)
from tvae_em.model import TargetVAE
from tvae_em.model.baselines import MLPVAE, count_parameters, fit, hidden_for_parameters
from tvae_em.simulate import make_mnist_variant
from tvae_em.train import train

SIZE = 50
SHIFT_STD_PX = 5.0
N_CLUSTERS = 10
SECTION = "## Paper tables (MNIST)"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"  # the workplace copy beside the repo
BASELINES = ("vae", "beta-vae", "spatial")
VARIANT_NAMES = {"N": "MNIST(N)", "U": "MNIST(U)"}

# Paper numbers: Table 1 (translation (x, y), rotation; z_dim 2) and Table 2 (clustering accuracy %).
PAPER_TABLE1 = {
    ("spatial", 2): {"N": ((0.994, 0.993), 0.564), "U": ((0.982, 0.983), 0.005)},
    ("target", 4): {"N": ((0.97, 0.972), 0.814), "U": ((0.975, 0.976), 0.80)},
    ("target", 8): {"N": ((0.981, 0.981), 0.89), "U": ((0.972, 0.971), 0.859)},
    ("target", 16): {"N": ((0.969, 0.972), 0.898), "U": ((0.974, 0.971), 0.93)},
}
PAPER_TABLE2 = {
    ("vae", 4, 0): {"N": 15.3, "U": 12.8}, ("beta-vae", 4, 0): {"N": 15.1, "U": 18.0},
    ("spatial", 2, 0): {"N": 37.1, "U": 28.2},
    ("target", 2, 4): {"N": 56.4, "U": 56.6}, ("target", 2, 8): {"N": 60.1, "U": 57.1},
    ("target", 2, 16): {"N": 60.1, "U": 63.4}, ("target", 32, 4): {"N": 65.1, "U": 64.3},
    ("target", 32, 8): {"N": 77.7, "U": 69.1}, ("target", 32, 16): {"N": 75.2, "U": 71.2},
}


@dataclass(frozen=True)
class Budget:
    """Data, model width and optimisation of one preset (the paper's are ``gpu``)."""

    n_train: int  # digits drawn for training (train() holds 10 % of them out for validation)
    n_test: int  # held-out digits that are scored
    fields: int
    kernel: int
    padding: int
    generator_width: int
    generator_depth: int
    fourier_features: int
    fourier_scale: float  # cycles per pixel
    epochs: int
    recipe: str = "default"  # TrainConfig.preset: tvae-em's recipe or the paper's
    pointwise: str = ModelConfig.encoder_pointwise  # the encoder's 1x1 layers: 'group' or 'shared'
    random_phase: bool = ModelConfig.fourier_random_phase  # the generator's inputs: cos(2 pi B x + phi)

    def train_config(self, **changes) -> TrainConfig:
        return TrainConfig.preset(self.recipe, epochs=self.epochs, **changes)


BUDGETS = {
    "tiny": Budget(n_train=100, n_test=100, fields=2, kernel=17, padding=4, generator_width=16,
                   generator_depth=1, fourier_features=8, fourier_scale=0.08, epochs=1),
    # cpu: the original code's small model (kernel 33, 128 Fourier features) with 16 instead of 32 fields, a
    # generator of 2 layers (the paper's depth; the original small model has 3) and padding 4, so that the
    # 26 x 26 translation cells reach +-12.5 px (2.5 standard deviations of the digits' shifts) rather than
    # +-16.5 px: 42 % fewer cells. 12 epochs of tvae-em's default recipe (batches of 32, Adam 2e-3, coarse to
    # fine): at 8, P8 MNIST(U) was still finding its frame (rotation 0.74-0.81 over 3 seeds, 0.87 at 12;
    # benchmarks/RESULTS.md, "Training that learns"); the whole grid takes about 3 h on 2 cores.
    "cpu": Budget(n_train=3000, n_test=1000, fields=16, kernel=33, padding=4, generator_width=256,
                  generator_depth=2, fourier_features=128, fourier_scale=0.08, epochs=12),
    # gpu: the paper's model and recipe (section 4.1)
    "gpu": Budget(n_train=60000, n_test=10000, fields=128, kernel=28, padding=8, generator_width=512,
                  generator_depth=2, fourier_features=1024, fourier_scale=0.12, epochs=500, recipe="paper"),
}


# --- data -------------------------------------------------------------------------------------------------

def load_digits(directory, budget: Budget) -> tuple[dict, str]:
    """(train digits, test digits) as (images, labels) and a sentence saying where they came from."""
    train_x, train_y = mnist_split(directory, "train", n_holdout=budget.n_test)
    test_x, test_y = mnist_split(directory, "test", n_holdout=budget.n_test)
    n_train, n_test = min(budget.n_train, len(train_x)), min(budget.n_test, len(test_x))
    if has_mnist(directory, "train"):
        source = (f"the first {n_train} of the 60,000 MNIST training digits; the first {n_test} of the "
                  "10,000 t10k digits held out")
    else:
        source = (f"only the 10,000 t10k digits are present: training digits are the first {n_train} of "
                  f"t10k[:{len(train_x)}], the held-out digits are t10k[{len(train_x)}:] (mnist_split)")
    return {"train": (train_x[:n_train], train_y[:n_train]), "test": (test_x[:n_test], test_y[:n_test])}, source


def make_variant(digits: dict, variant: str) -> dict:
    """Training images and posed + canonical test images of MNIST(N) or MNIST(U) (different seeds)."""
    train_set = make_mnist_variant(*digits["train"], variant, size=SIZE, seed=[0, ord(variant)],
                                   shift_std_px=SHIFT_STD_PX)
    test_set = make_mnist_variant(*digits["test"], variant, size=SIZE, seed=[1, ord(variant)],
                                  shift_std_px=SHIFT_STD_PX)
    return {"train": np.clip(train_set["images"], 0, 1), "test": test_set}


# --- models -----------------------------------------------------------------------------------------------

def target_config(budget: Budget, rotations: int, z_dim: int, variant: str) -> ModelConfig:
    return ModelConfig(image_size=SIZE, rotations=rotations, z_dim=z_dim, encoder_fields=budget.fields,
                       encoder_kernel=budget.kernel, encoder_padding=budget.padding,
                       generator_width=budget.generator_width, generator_depth=budget.generator_depth,
                       fourier_features=budget.fourier_features, fourier_scale=budget.fourier_scale,
                       fourier_random_phase=budget.random_phase,
                       encoder_pointwise=budget.pointwise, likelihood="bernoulli", translation_prior_std=SHIFT_STD_PX,
                       rotation_prior="normal" if variant == "N" else "uniform")


def spatial_config(budget: Budget, variant: str) -> ModelConfig:
    """Spatial-VAE as a special case of TARGET-VAE: one rotation (a plain Gaussian theta, prior std pi as
    spatial-VAE's), one translation cell (the kernel covers the whole image, so the encoder is an MLP) and a
    continuous shift with the translation prior's std. Spatial-VAE's own encoder is a plain MLP; this one is
    a single full-image linear layer followed by 1x1 layers, the same function class."""
    config = target_config(budget, 1, 2, variant)
    config.encoder_kernel, config.encoder_padding = SIZE, 0
    config.subpixel, config.shift_prior_std = True, SHIFT_STD_PX
    if variant == "N":
        config.theta_prior_std = np.pi / 4
    return config


def train_target(config: ModelConfig, budget: Budget, images: np.ndarray, run_dir: Path, progress: bool,
                 seed: int = 0):
    train_config = budget.train_config(num_workers=0, progress=progress, seed=seed)
    resume = (run_dir / "checkpoint_last.pt").exists()  # continue a run that was interrupted
    result = train(config, train_config, ArrayParticles(images), run_dir, resume=resume)
    model, _ = load_model(run_dir, for_inference=False)  # escnn's encoder: its parameters count in Table 2
    model.encoder.export()
    return model, result.epochs


def train_baseline(name: str, budget: Budget, images: np.ndarray, target_params: int, progress: bool,
                   seed: int = 0):
    hidden = hidden_for_parameters(SIZE, 4, target_params)
    torch.manual_seed(seed)
    model = MLPVAE(SIZE, z_dim=4, hidden=hidden, beta=4.0 if name == "beta-vae" else 1.0)
    report = (lambda e, elbo: print(f"{name} epoch {e}: training ELBO {elbo:.2f}", file=sys.stderr)) \
        if progress else None
    recipe = budget.train_config()
    fit(model, torch.from_numpy(images), recipe.epochs, recipe.lr, recipe.batch_size, progress=report)
    return model, budget.epochs


# --- scoring ----------------------------------------------------------------------------------------------

def encode_all(model, images: np.ndarray, batch: int = 250) -> dict:
    parts = [model.encode(torch.from_numpy(np.ascontiguousarray(images[i:i + batch], np.float32)))
             for i in range(0, len(images), batch)]
    return {key: torch.cat([getattr(p, key) for p in parts]).cpu().numpy()
            for key in ("z_mu", "theta", "t") if hasattr(parts[0], key)}


def score(model, test_set: dict) -> dict:
    """Pose (if the model infers one) and clustering scores on the held-out digits."""
    posed = encode_all(model, test_set["images"])
    labels = test_set["labels"]
    ward = cluster(posed["z_mu"], N_CLUSTERS, "ward")
    kmeans = cluster(posed["z_mu"], N_CLUSTERS, "kmeans")
    scores = {"ward_accuracy": clustering_accuracy(labels, ward), "ward_nmi": nmi(labels, ward),
              "kmeans_accuracy": clustering_accuracy(labels, kmeans), "kmeans_nmi": nmi(labels, kmeans)}
    if "theta" in posed:
        canonical = encode_all(model, test_set["canonical"])
        _, t_rel = relative_pose(posed["theta"], posed["t"], canonical["theta"], canonical["t"])
        scores["rotation"] = rotation_correlation(test_set["theta"], posed["theta"], canonical["theta"])
        scores["translation_raw"] = translation_correlation(test_set["t_model"], posed["t"])
        scores["translation_relative"] = translation_correlation(test_set["t_model"], t_rel)
    return scores


# --- the grid ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    kind: str  # 'target', 'spatial', 'vae', 'beta-vae'
    variant: str  # 'N' or 'U'
    z_dim: int
    rotations: int = 0  # TARGET-VAE only

    @property
    def name(self) -> str:
        if self.kind == "target":
            return f"target_P{self.rotations}_z{self.z_dim}_{self.variant}"
        return f"{self.kind}_{self.variant}"


def grid(args) -> list[Cell]:
    cells = []
    for variant in args.variants:
        cells += [Cell(kind, variant, 2 if kind == "spatial" else 4) for kind in args.baselines]  # fast first
        cells += [Cell("target", variant, z, r) for z in args.z_dims for r in args.groups]
    return cells


def run_cell(cell: Cell, budget: Budget, data: dict, cell_dir: Path, progress: bool, seed: int = 0) -> dict:
    images = data[cell.variant]["train"]
    start = time.perf_counter()
    if cell.kind in ("target", "spatial"):
        config = (target_config(budget, cell.rotations, cell.z_dim, cell.variant) if cell.kind == "target"
                  else spatial_config(budget, cell.variant))
        model, epochs = train_target(config, budget, images, cell_dir / "run", progress, seed)
    else:
        reference = target_config(budget, 8, 2, cell.variant)
        model, epochs = train_baseline(cell.kind, budget, images, count_parameters(TargetVAE(reference)), progress,
                                       seed)
    seconds = time.perf_counter() - start
    result = {**asdict(cell), "params": count_parameters(model), "epochs": epochs,
              "n_train": len(images), "train_seconds": round(seconds, 1),
              **score(model, data[cell.variant]["test"]), "machine": machine()}
    with atomic_path(cell_dir / "scores.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    return result


def machine() -> str:
    """CPU model and thread count (and the GPU when training runs on one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


# --- tables -----------------------------------------------------------------------------------------------

def _pair(values) -> str:
    return "—" if values is None else f"{values[0]:.3f}, {values[1]:.3f}"


def _num(value, fmt=".3f") -> str:
    return "—" if value is None else format(value, fmt)


def _label(kind: str, rotations: int, z_dim: int) -> str:
    names = {"vae": "VAE", "beta-vae": "beta-VAE (beta 4)", "spatial": "spatial-VAE (TARGET-VAE P1 options)"}
    return f"TARGET-VAE P{rotations}" if kind == "target" else names[kind]


def table1(results: dict) -> list[str]:
    lines = ["| Model (z_dim 2) | Data | Translation r (x, y): paper | ours raw | ours relative | "
             "Rotation r: paper | ours | Train s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kind, rotations), paper in PAPER_TABLE1.items():
        for variant in "NU":
            ours = results.get(Cell(kind, variant, 2, rotations if kind == "target" else 0).name, {})
            lines.append(
                f"| {_label(kind, rotations, 2)} | {VARIANT_NAMES[variant]} | {_pair(paper[variant][0])} | "
                f"{_pair(ours.get('translation_raw'))} | {_pair(ours.get('translation_relative'))} | "
                f"{paper[variant][1]:.3f} | {_num(ours.get('rotation'))} | {_num(ours.get('train_seconds'), '.0f')} |")
    return lines


def table2(results: dict) -> list[str]:
    lines = ["| Model | z_dim | Data | Params | Accuracy % (Ward): paper | ours | k-means acc % | NMI (Ward) | "
             "Train s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kind, z_dim, rotations), paper in PAPER_TABLE2.items():
        for variant in "NU":
            ours = results.get(Cell(kind, variant, z_dim, rotations).name, {})
            percent = {key: None if key not in ours else 100 * ours[key]
                       for key in ("ward_accuracy", "kmeans_accuracy")}
            lines.append(
                f"| {_label(kind, rotations, z_dim)} | {z_dim} | {VARIANT_NAMES[variant]} | "
                f"{ours.get('params', '—')} | {paper[variant]:.1f} | {_num(percent['ward_accuracy'], '.1f')} | "
                f"{_num(percent['kmeans_accuracy'], '.1f')} | {_num(ours.get('ward_nmi'))} | "
                f"{_num(ours.get('train_seconds'), '.0f')} |")
    return lines


def _recipe(budget: Budget) -> str:
    config = budget.train_config()
    return (f"`{budget.recipe}` (batches of {config.batch_size}, Adam {config.lr:g}, coarse to fine over "
            f"{config.coarse_to_fine:g} of {config.epochs} epochs)")


def report(results: dict, budget_name: str, budget: Budget, source: str, wall_seconds: float | None) -> str:
    """The RESULTS.md section; ``wall_seconds`` is None when this invocation trained nothing."""
    machines = sorted({r["machine"] for r in results.values()})
    train_total = sum(r["train_seconds"] for r in results.values())
    invocation = "" if wall_seconds is None else f"; this invocation: {wall_seconds / 60:.1f} min"
    head = [
        f"Preset `{budget_name}`: {asdict(budget)}; training recipe: {_recipe(budget)}.",
        f"Data: {source}; 50 x 50 canvas, shifts N(0, 5^2) px, rotations N(0, pi^2/16) (N) or U(0, 2 pi) (U); "
        f"train() holds 10 % of the training digits out for early stopping.",
        f"Machine: {'; '.join(machines) or machine()}. Training wall time of the {len(results)} cells listed: "
        f"{train_total / 60:.1f} min{invocation}.",
        "Baselines (VAE, beta-VAE: z_dim 4, MLP 2 hidden layers) are sized to the TARGET-VAE P8 z_dim 2 model; "
        "'—' = cell not run. Paper numbers: 60k digits, 128 fields, A100, up to 500 epochs.",
        "Translation 'relative' subtracts the model's pose on the centred, unrotated digit "
        "(`metrics.relative_pose`), the paper's rotation protocol applied to t.",
    ]
    return "\n".join(["### Table 1: translation and rotation correlation (held-out digits)", "",
                      *head, "", *table1(results), "",
                      "### Table 2: clustering accuracy of the most probable z (held-out digits)", "",
                      *table2(results), ""])


def write_section(path: Path, body: str, section: str = SECTION) -> None:
    """Replace (or append) a '## ...' section of a markdown file (this script's by default), keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == section), None)
    if start is None:
        kept_before, kept_after = lines, []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        kept_before, kept_after = lines[:start], lines[end:]
    while kept_before and not kept_before[-1].strip():
        kept_before.pop()
    new = [*kept_before, "", section, "", *body.rstrip().splitlines(), ""]
    if kept_after:
        new += ["", *kept_after]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(new).rstrip() + "\n")


def collect(budget_dir: Path) -> dict:
    results = {}
    for path in sorted(budget_dir.glob("*/scores.json")):
        results[path.parent.name] = json.loads(path.read_text())
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_MNIST), help="folder with the MNIST IDX files")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16], help="rotations of P_r")
    parser.add_argument("--z-dims", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--variants", nargs="+", choices=["N", "U"], default=["N", "U"])
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "mnist_tables")
    parser.add_argument("--rerun", action="store_true", help="retrain cells that were already scored")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (initialisation, split, data order); seeds other than 0 keep their "
                             "cells in --workdir/<budget>_seed<S>")
    parser.add_argument("--encoder-pointwise", choices=["group", "shared"], default=ModelConfig.encoder_pointwise,
                        help="the encoder's 1x1 layers; cells with shared ones are kept in "
                             "--workdir/<budget>[_seed<S>]_shared")
    parser.add_argument("--fourier-random-phase", action=argparse.BooleanOptionalAction,
                        default=ModelConfig.fourier_random_phase,
                        help="phase-shifted cosines as the generator's inputs; such cells are kept in "
                             "--workdir/<budget>[_seed<S>][_shared]_random_phase")
    parser.add_argument("--results", type=Path, nargs="?", const=DEFAULT_RESULTS, default=None,
                        help=f"also write the tables into this file's '{SECTION}' section "
                             f"(default {DEFAULT_RESULTS.name})")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the cells already scored in --workdir for the budget")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    start = time.perf_counter()
    budget = replace(BUDGETS[args.budget], pointwise=args.encoder_pointwise, random_phase=args.fourier_random_phase)
    budget_dir = args.workdir / (args.budget if args.seed == 0 else f"{args.budget}_seed{args.seed}")
    # the folders of cells from before these options hold group 1x1 layers and [cos, sin] inputs, whatever the
    # defaults: other kinds get their own
    if budget.pointwise != "group":
        budget_dir = budget_dir.with_name(f"{budget_dir.name}_{budget.pointwise}")
    if budget.random_phase:
        budget_dir = budget_dir.with_name(f"{budget_dir.name}_random_phase")
    digits, source = load_digits(args.data, budget)
    data = {variant: make_variant(digits, variant) for variant in args.variants}
    for cell in [] if args.report_only else grid(args):
        cell_dir = budget_dir / cell.name
        if args.rerun and cell_dir.exists():
            shutil.rmtree(cell_dir)
        if (cell_dir / "scores.json").exists():
            continue
        if not args.quiet:
            print(f"--- {cell.name}", file=sys.stderr)
        result = run_cell(cell, budget, data, cell_dir, progress=not args.quiet, seed=args.seed)
        if not args.quiet:
            print(json.dumps(result), file=sys.stderr)
    wall_seconds = None if args.report_only else time.perf_counter() - start
    text = report(collect(budget_dir), args.budget, budget, source, wall_seconds)
    print(text)
    if args.results is not None:
        write_section(args.results, text)
    return text


if __name__ == "__main__":
    main()
