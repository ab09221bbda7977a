"""Load test of ``embed``: a particle STAR of N rows (default 1,000,000) over a few float32 stacks.

Builds the data set in ``--out`` (stacks written chunk by chunk with ``io.stack.write_stack``; a RELION 3.1
STAR with the usual dozen columns whose rows point into the stacks in runs of 100 consecutive images, as the
particles of one micrograph do, cycling through the stacks, so rows reuse images when the stacks hold fewer
than N), saves a tiny randomly initialised model (nothing is trained: the encoder's arithmetic is not what is
measured, so its grid is made small), then runs ``tvae_em.infer.embed`` in a fresh process and reports:

- wall time of ``embed`` (reading, encoding, clustering if asked, writing the STAR, the npz and the plot);
- RSS before ``embed`` (after imports and a first model load) and peak RSS (``ru_maxrss``) during it, against
  the size of the STAR table (file and parsed in memory) and of all the rows' images;
- that the output STAR has exactly one row per input row, in the same order (``rlnImageName`` compared).

Run from the repository root with the package importable (``bin/install``, or ``PYTHONPATH=.``):

    python benchmarks/load_embed.py                          # 1,000,000 rows, 10 stacks of 100,000 (4 GB)
    python benchmarks/load_embed.py --rows 100000 --clusters 5
"""

import argparse
import math
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from tvae_em import checkpoint
from tvae_em.config import ModelConfig
from tvae_em.io.stack import write_stack
from tvae_em.io.star import new_relion31_star, numeric_column, read_star, write_star

RUN_LENGTH = 100  # consecutive images of one stack per block of rows, like the particles of one micrograph
CHUNK_IMAGES = 10_000  # images generated and written per chunk
APIX = 1.5
MB = 1 << 20


def build_dataset(folder, n_rows: int, n_stacks: int = 10, images_per_stack: int | None = None, box: int = 32,
                  seed: int = 0) -> Path:
    """Write ``n_stacks`` stacks of random box x box images and ``particles.star`` with ``n_rows`` rows into
    ``folder``; returns the STAR path. By default the stacks hold every row's own image (up to 100,000
    each)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if images_per_stack is None:
        images_per_stack = min(100_000, math.ceil(n_rows / n_stacks))
    rng = np.random.default_rng(seed)
    for stack in range(n_stacks):
        chunks = (rng.standard_normal((min(CHUNK_IMAGES, images_per_stack - start), box, box), np.float32)
                  for start in range(0, images_per_stack, CHUNK_IMAGES))
        write_stack(folder / f"stack{stack:02d}.mrcs", chunks, APIX)
    star = folder / "particles.star"
    write_star(star, new_relion31_star(_optics(box), _particles(n_rows, n_stacks, images_per_stack, rng)))
    return star


def _optics(box: int) -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                         "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                         "rlnVoltage": [300.0],
                         "rlnImagePixelSize": [APIX], "rlnImageSize": [box], "rlnImageDimensionality": [2]})


def _particles(n_rows: int, n_stacks: int, images_per_stack: int, rng) -> pd.DataFrame:
    """Rows in blocks of RUN_LENGTH consecutive images; block b in stack b mod n_stacks."""
    row = np.arange(n_rows)
    block = row // RUN_LENGTH
    stack = block % n_stacks
    index = ((block // n_stacks) * RUN_LENGTH + row % RUN_LENGTH) % images_per_stack + 1
    names = pd.Series(index).map("{:06d}".format) + "@" + pd.Series(stack).map("stack{:02d}.mrcs".format)
    micrograph = pd.Series(block).map("MotionCorr/job002/Movies/mic{:05d}.mrc".format)
    defocus = rng.uniform(8000, 30000, n_rows).round(6)
    return pd.DataFrame({
        "rlnCoordinateX": rng.uniform(0, 4096, n_rows).round(6),
        "rlnCoordinateY": rng.uniform(0, 4096, n_rows).round(6),
        "rlnImageName": names, "rlnMicrographName": micrograph, "rlnOpticsGroup": np.ones(n_rows, np.int64),
        "rlnDefocusU": defocus, "rlnDefocusV": (defocus + rng.uniform(0, 500, n_rows)).round(6),
        "rlnDefocusAngle": rng.uniform(-180, 180, n_rows).round(6), "rlnPhaseShift": np.zeros(n_rows),
        "rlnCtfMaxResolution": rng.uniform(3, 8, n_rows).round(6),
        "rlnCtfFigureOfMerit": rng.uniform(0, 0.3, n_rows).round(6), "rlnAnglePsi": np.full(n_rows, -999.0),
        "rlnClassNumber": rng.integers(1, 51, n_rows)})


def save_tiny_run(run_dir, box: int, seed: int = 0, **model_overrides) -> Path:
    """A run folder with ``checkpoint_best.pt`` of a randomly initialised tiny model for ``box`` px images.

    Default geometry: 4 rotations, 2 regular fields, a (box - 3) px kernel without padding, so the encoder
    evaluates only a 4 x 4 translation grid and costs little next to reading and writing."""
    tiny = dict(image_size=box, rotations=4, z_dim=2, encoder_fields=2, encoder_kernel=box - 3,
                encoder_padding=0, generator_width=16, generator_depth=1, fourier_features=16,
                likelihood="gaussian", gaussian_std=1.0)
    config = ModelConfig(**{**tiny, **model_overrides})
    model = checkpoint.build_model(config, seed=seed)
    state = {"model_config": config.to_dict(), "train_config": {},
             "model_state": checkpoint.model_state(model), "epoch": 0}
    checkpoint.save_checkpoint(state, Path(run_dir) / checkpoint.BEST)
    return Path(run_dir)


def _resident_mb() -> float:
    """Current RSS (Linux /proc), or the peak so far where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:
        return _peak_mb()


def _reset_peak() -> bool:
    """Restart the kernel's peak-RSS record (Linux >= 4.0), so the peak is that of what follows only."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak RSS: VmHWM (the value ru_maxrss reports, but resettable), else ru_maxrss since the start."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _embed_in_this_process(run_dir, star, out_star, embed_options: dict) -> dict:
    """Time ``embed`` and record RSS before it and its peak, in a fresh process so that nothing earlier sets
    the peak. The model is loaded once first, so the baseline holds what any model load keeps resident."""
    from tvae_em import infer

    checkpoint.load_model(run_dir)
    peak_reset = _reset_peak()
    rss_before = _resident_mb()
    start = time.perf_counter()
    infer.embed(run_dir, star, out_star, **embed_options)
    return {"embed_s": time.perf_counter() - start, "rss_before_mb": rss_before, "rss_peak_mb": _peak_mb(),
            "peak_since_start": not peak_reset}


def measure_embed(run_dir, star, out_star, **embed_options) -> dict:
    """``embed`` in a fresh interpreter; returns embed_s, rss_before_mb, rss_peak_mb."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_embed_in_this_process, run_dir, star, out_star, embed_options).result()


def run_benchmark(folder, n_rows: int = 1_000_000, n_stacks: int = 10, images_per_stack: int | None = None,
                  box: int = 32, clusters: int | None = None, batch_size: int = 1024, device: str = "cpu",
                  model_overrides: dict | None = None) -> dict:
    """Build the data set and run, measure and check ``embed`` (k-means when ``clusters`` is given)."""
    folder = Path(folder)
    start = time.perf_counter()
    star = build_dataset(folder, n_rows, n_stacks, images_per_stack, box)
    run_dir = save_tiny_run(folder / "run", box, **(model_overrides or {}))
    build_s = time.perf_counter() - start
    out_star = folder / "embedded.star"
    measured = measure_embed(run_dir, star, out_star, clusters=clusters, method="kmeans",
                             batch_size=batch_size, device=device)
    table = read_star(star)["particles"]
    output = read_star(out_star)
    result = {"rows": n_rows, "stacks": n_stacks, "box": box, "build_s": build_s, **measured,
              "star_file_mb": star.stat().st_size / MB,
              "star_table_mb": table.memory_usage(deep=True).sum() / MB,
              "all_images_mb": n_rows * box * box * 4 / MB,
              "output_rows": len(output["particles"]),
              "order_kept": np.array_equal(output["particles"]["rlnImageName"].to_numpy(),
                                           table["rlnImageName"].to_numpy()),
              "z_finite": bool(np.isfinite(numeric_column(output, "particles", "tvaeZ01")).all())}
    result["growth_mb"] = result["rss_peak_mb"] - result["rss_before_mb"]
    return result


def markdown_table(result: dict) -> str:
    columns = [("rows", "{:,}"), ("stacks", "{}"), ("box", "{}"), ("STAR file (MB)", "{:.0f}"),
               ("STAR table in memory (MB)", "{:.0f}"), ("all rows' images (MB)", "{:.0f}"),
               ("embed wall (s)", "{:.1f}"), ("rows/s", "{:,.0f}"), ("RSS before (MB)", "{:.0f}"),
               ("peak RSS (MB)", "{:.0f}"), ("growth (MB)", "{:.0f}"), ("growth / STAR table", "{:.2f}"),
               ("one row per input row, same order", "{}")]
    values = [result["rows"], result["stacks"], result["box"], result["star_file_mb"],
              result["star_table_mb"], result["all_images_mb"], result["embed_s"],
              result["rows"] / result["embed_s"], result["rss_before_mb"], result["rss_peak_mb"],
              result["growth_mb"], result["growth_mb"] / result["star_table_mb"],
              "yes" if result["order_kept"] and result["output_rows"] == result["rows"] else "NO"]
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join(" --- " for _ in columns) + "|"
    row = "| " + " | ".join(fmt.format(value) for (_, fmt), value in zip(columns, values, strict=True)) + " |"
    return "\n".join([header, rule, row])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stacks", type=int, default=10)
    parser.add_argument("--images-per-stack", type=int, help="default: rows / stacks, at most 100,000")
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--clusters", type=int, help="k-means into this many clusters (default: none)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/load_embed"))
    parser.add_argument("--keep", action="store_true", help="keep the data set and outputs in --out")
    args = parser.parse_args(argv)
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it or choose another --out")
    try:
        result = run_benchmark(args.out, args.rows, args.stacks, args.images_per_stack, args.box,
                               args.clusters, args.batch_size, args.device)
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    print(markdown_table(result))
    print(f"\ndata set built in {result['build_s']:.1f} s")
    if not (result["order_kept"] and result["output_rows"] == result["rows"] and result["z_finite"]):
        sys.exit("the output STAR does not have one row per input row in the input order, or non-finite z")


if __name__ == "__main__":
    main()
