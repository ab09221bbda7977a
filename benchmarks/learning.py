"""Does ``tvae-em`` learn poses and classes with its defaults, on every seed? (issue 18)

Everything runs through the command line, as a user runs it, one study and one seed at a time:

- demo: the README's first command, ``tvae-em demo -o DIR --seed S``, scored by its own report (rotation
  circular correlation, translation Pearson r, Ward clustering accuracy against the three simulated objects);
- cryoem: a cryo-EM-like simulation, one asymmetric object in two conformations (a domain swung by 60 degrees),
  seen in views tilted by up to 30 degrees, uniform in-plane rotation, shifts of 3 px std, SNR 1: 2,000
  particles simulated at 96 px of 4 Å and taken to 48 px of 8 Å by ``tvae-em preprocess -D 48``; then
  ``tvae-em train`` with the default recipe (or ``--preset``) and a small model for 10 epochs, ``embed
  --clusters 2`` and ``pose``, scored against the simulated truth (``demo.truth_scores``);
- ctf: the same particles seen through a CTF (defocus 1.0-2.5 um, astigmatism up to 600 Å, 300 kV), trained
  with the CTF modelled (``--ctf auto``), ignored (``--ctf none``) and after ``preprocess --phase-flip``; the
  table adds the largest |Pearson r| between a latent coordinate and the particles' defocus.

Prints a table per study with the wall time of each run on this machine; ``--results`` also writes each study's
table into its own section of benchmarks/RESULTS.md (``SECTIONS``; other sections are kept), so that studies
can be run one at a time.

    python benchmarks/learning.py --studies demo cryoem --seeds 0 1 2 --results
    python benchmarks/learning.py --studies ctf --seeds 0 --results
    python benchmarks/learning.py --studies cryoem --preset paper --seeds 0      # the paper's recipe
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from mnist_tables import DEFAULT_RESULTS, machine, write_section

from tvae_em import demo, simulate
from tvae_em.io.star import numeric_column, particles_block, read_star
from tvae_em.metrics import pearson

SECTIONS = {"demo": "## Training that learns: the demo", "cryoem": "## Training that learns: two conformations",
            "ctf": "## The CTF: modelled, ignored, phase-flipped"}
CRYOEM_MODEL = ["--rotations", "8", "--z-dim", "2", "--encoder-fields", "16", "--generator-width", "128",
                "--generator-depth", "3", "--fourier-features", "128"]
CRYOEM_PARTICLES, CRYOEM_SIM_BOX, CRYOEM_BOX, CRYOEM_EPOCHS = 2000, 96, 48, 10
TRAIN_APIX = 8.0  # Å per pixel in training, as for 2-D classification (simulated at half of it, then -D 48)
REPORT_LINES = {"rotation": r"rotation circular correlation\s+([-\d.]+)",
                "translation": r"translation Pearson correlation x\s+([-\d.]+), y ([-\d.]+)",
                "accuracy": r"clustering accuracy.*?([-\d.]+) %"}


def tvae(*args, log: Path) -> float:
    """Run ``tvae-em ARGS`` (this interpreter's package), stderr appended to ``log``; returns the wall seconds."""
    start = time.perf_counter()
    with open(log, "a") as err:
        subprocess.run([sys.executable, "-m", "tvae_em.cli", *map(str, args)], check=True, stderr=err,
                       stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_demo(seed: int, workdir: Path) -> dict:
    out = workdir / f"demo_seed{seed}"
    start = time.perf_counter()
    report = subprocess.run([sys.executable, "-m", "tvae_em.cli", "demo", "-o", str(out), "--seed", str(seed)],
                            check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    rotation = float(re.search(REPORT_LINES["rotation"], report).group(1))
    tx, ty = map(float, re.search(REPORT_LINES["translation"], report).groups())
    accuracy = float(re.search(REPORT_LINES["accuracy"], report).group(1)) / 100
    return {"seed": seed, "rotation": rotation, "translation_x": tx, "translation_y": ty, "accuracy": accuracy,
            "train_s": None, "wall_s": wall}


# The CTF study's variants: (simulated with a CTF, preprocess options, train --ctf)
CTF_VARIANTS = {"no CTF in the data": (False, [], "auto"), "CTF modelled (--ctf auto)": (True, [], "auto"),
                "CTF ignored (--ctf none)": (True, [], "none"),
                "phase flipped (preprocess --phase-flip), --ctf none": (True, ["--phase-flip"], "none")}


def cryoem_model(fourier_features: int | None, pointwise: str | None = None, random_phase: bool = False
                 ) -> list[str]:
    """The study's model options, with another number of the generator's Fourier features, another kind of
    encoder 1x1 layers and phase-shifted cosines if given."""
    options = list(CRYOEM_MODEL)
    if fourier_features is not None:
        options[options.index("--fourier-features") + 1] = str(fourier_features)
    return (options + ([] if pointwise is None else ["--encoder-pointwise", pointwise])
            + (["--fourier-random-phase"] if random_phase else []))


def run_cryoem(seed: int, workdir: Path, preset: str, variant: str = "no CTF in the data",
               train_apix: float = TRAIN_APIX, fourier_features: int | None = None,
               pointwise: str | None = None, random_phase: bool = False) -> dict:
    """One run of the cryoem or ctf study; ``train_apix`` sets how many CTF rings fall inside the box (the
    objects are the same size in pixels at every pixel size)."""
    with_ctf, preprocess_options, ctf = CTF_VARIANTS[variant]
    name = f"cryoem_{preset}_{re.sub(r'[^a-z]+', '_', variant.lower()).strip('_')}_seed{seed}"
    name += "" if train_apix == TRAIN_APIX else f"_apix{train_apix:g}"
    name += "" if fourier_features is None else f"_ff{fourier_features}"
    name += "" if pointwise is None else f"_{pointwise}"
    out = workdir / (f"{name}_random_phase" if random_phase else name)
    log = out / "stderr.log"
    out.mkdir(parents=True, exist_ok=True)
    sim = simulate.write_particles(out / "sim", CRYOEM_PARTICLES, box=CRYOEM_SIM_BOX, n_objects=2, snr=1.0,
                                   seed=seed, shift_std_px=3.0 * CRYOEM_SIM_BOX / CRYOEM_BOX,
                                   apix=train_apix * CRYOEM_BOX / CRYOEM_SIM_BOX,
                                   objects="conformations", defocus_um=(1.0, 2.5) if with_ctf else None)
    start = time.perf_counter()
    tvae("preprocess", sim, "-o", out / "prep", "-D", CRYOEM_BOX, *preprocess_options, log=log)
    prep = out / "prep" / "particles.star"
    train_s = tvae("train", prep, "-o", out / "run", "--preset", preset, "--epochs", CRYOEM_EPOCHS, "--seed",
                   seed, "--ctf", ctf, *cryoem_model(fourier_features, pointwise, random_phase), log=log)
    tvae("embed", out / "run", prep, "-o", out / "embedded.star", "--clusters", 2, log=log)
    tvae("pose", out / "run", prep, "-o", out / "posed.star", log=log)
    wall = time.perf_counter() - start
    scores = demo.truth_scores(out / "embedded.star", out / "posed.star")
    return {"seed": seed, **{k: scores[k] for k in ("rotation", "translation_x", "translation_y", "accuracy")},
            "defocus_r": defocus_correlation(out / "embedded.star") if with_ctf else None,
            "train_s": train_s, "wall_s": wall}


def defocus_correlation(embedded_star: Path) -> float:
    """The largest |Pearson r| between a latent coordinate and the particles' mean defocus."""
    star = read_star(embedded_star)
    block = particles_block(star)
    defocus = (numeric_column(star, block, "rlnDefocusU") + numeric_column(star, block, "rlnDefocusV")) / 2
    z = [numeric_column(star, block, label) for label in star[block].columns if re.fullmatch(r"tvaeZ\d+", label)]
    return max(abs(pearson(defocus, values)) for values in z)


def table(title: str, rows: list[dict]) -> list[str]:
    defocus = any(row.get("defocus_r") is not None for row in rows)
    lines = [f"### {title}", "", "| seed | rotation r | translation r (x, y) | clustering accuracy % | "
             + ("max |r(z, defocus)| | " if defocus else "") + "train s | wall s |",
             "| --- " * (6 + defocus) + "|"]
    for row in rows:
        train_s = "—" if row["train_s"] is None else f"{row['train_s']:.0f}"
        cells = [str(row["seed"]), f"{row['rotation']:.3f}", f"{row['translation_x']:.3f}, {row['translation_y']:.3f}",
                 f"{100 * row['accuracy']:.1f}", *([f"{row['defocus_r']:.3f}"] if defocus else []), train_s,
                 f"{row['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", choices=["demo", "cryoem", "ctf"], default=["demo", "cryoem"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", choices=["default", "paper"], default="default",
                        help="training recipe of the cryoem and ctf studies (the demo always runs as shipped)")
    parser.add_argument("--train-apix", type=float, default=TRAIN_APIX,
                        help="Å per pixel in training for the cryoem and ctf studies (finer: more CTF rings)")
    parser.add_argument("--fourier-features", type=int,
                        help="the generator's Fourier features in the cryoem and ctf studies (default: "
                             f"{CRYOEM_MODEL[CRYOEM_MODEL.index('--fourier-features') + 1]})")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "learning")
    parser.add_argument("--results", type=Path, nargs="?", const=DEFAULT_RESULTS, default=None,
                        help="also write each study's table into its section of this file")
    parser.add_argument("--encoder-pointwise", choices=["group", "shared"],
                        help="the encoder's 1x1 layers in the cryoem and ctf studies (default: train's)")
    parser.add_argument("--fourier-random-phase", action="store_true",
                        help="phase-shifted cosines as the generator's inputs in the cryoem and ctf studies")
    args = parser.parse_args(argv)
    header = [f"Machine: {machine()}; one run at a time, everything through the `tvae-em` command line.", ""]
    model_options = cryoem_model(args.fourier_features, args.encoder_pointwise, args.fourier_random_phase)
    model = f"`train --preset {args.preset} --epochs {CRYOEM_EPOCHS} {' '.join(model_options)}`"
    particles = f"{CRYOEM_PARTICLES} particles of {CRYOEM_BOX} px of {args.train_apix:g} Å, SNR 1"
    bodies = {}
    if "demo" in args.studies:
        rows = [run_demo(seed, args.workdir) for seed in args.seeds]
        bodies["demo"] = table("`tvae-em demo -o DIR --seed S` (the README's command)", rows)
    if "cryoem" in args.studies:
        rows = [run_cryoem(seed, args.workdir, args.preset, train_apix=args.train_apix,
                           fourier_features=args.fourier_features, pointwise=args.encoder_pointwise,
                           random_phase=args.fourier_random_phase) for seed in args.seeds]
        bodies["cryoem"] = table(f"Two conformations, {particles}: {model}", rows)
    if "ctf" in args.studies:
        bodies["ctf"] = []
        for variant in list(CTF_VARIANTS)[1:]:
            rows = [run_cryoem(seed, args.workdir, args.preset, variant, args.train_apix, args.fourier_features,
                               args.encoder_pointwise, args.fourier_random_phase) for seed in args.seeds]
            bodies["ctf"] += table(f"Two conformations through a CTF (defocus 1.0-2.5 um, astigmatism up to 600 Å), "
                                   f"{particles}; {variant}: {model}", rows)
    text = "\n".join(header + [line for body in bodies.values() for line in body])
    print(text)
    if args.results is not None:
        for study, body in bodies.items():
            section = SECTIONS[study] + ("" if study == "demo" else f" ({args.train_apix:g} Å per pixel)")
            write_section(args.results, "\n".join(header + body), section)
    return text


if __name__ == "__main__":
    main()
