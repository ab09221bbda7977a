"""Training and inference throughput, peak memory and distance from the arithmetic floor (issue 6).

For the paper's MNIST configuration (50x50, P8, 128 encoder fields, kernel 28 padding 8, generator 512 wide depth
2, 1024 Fourier features, z_dim 2, batches of 100) and a cryo-EM configuration (100x100, P8, kernel 56 padding
16, six-layer 512 generator, Gaussian likelihood), on CPU and, when present, on the GPU, two paths side by side:

- naive: float32, the reference kernels (``ModelConfig.kernels = "reference"``): escnn's own modules in training
  and inference, Fourier features materialised; what the first correct version did;
- fast: what ``tvae-em train`` / ``embed`` / ``pose`` do: plain-torch encoder layers on escnn's filters
  (1x1 group convolutions as matrix products over a channels-last layout), chunked fused Fourier features,
  bfloat16 autocast where ``amp='auto'`` enables it (CUDA, AMX-BF16 CPUs), in training and in inference
  (``model.encode`` on the exported encoder, the embed/pose path, output layer in float32).

Every measurement runs in a fresh process (multiprocessing 'spawn'), so its peak resident memory
(``ru_maxrss``) is its own: model construction (escnn's filter-basis sampling included), a warm-up and the timed
steps. A training step is ELBO forward + backward + Adam step on one batch; reading data is not included.

Arithmetic floor: multiply-adds of a step (encoder convolutions as escnn expands them to plain convolutions,
out_channels * in_channels * k^2 * M^2 * B; the 1x1 layers; the generator's matrix products; backward = 2x
forward, except the first convolution whose input needs no gradient) divided by the rate of a large ``torch.mm``
in the path's precision, measured in the same process right after the timed steps (so under the same load).
"x floor" = measured time / floor (1.0 would be perfect).

    python benchmarks/throughput.py [--quick] [--device auto|cpu|cuda] [--configs mnist,cryoem]

The cryo-EM configuration runs with --cpu-cryoem-batch images per batch on CPU (default 10: a batch of 100
takes minutes per step and its naive path more memory than a workstation has); its rows say which batch.
Timings on shared machines are noisy: each is the median of several steps, and the load average is printed.
"""

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch

from tvae_em.config import ModelConfig
from tvae_em.device import bf16_autocast, bf16_autocast_enabled, cpu_has_amx_bf16
from tvae_em.model import TargetVAE
from tvae_em.model.plain_encoder import output_fields

CONFIGS = {
    "mnist": dict(image_size=50, rotations=8, z_dim=2, encoder_fields=128, encoder_kernel=28, encoder_padding=8,
                  generator_width=512, generator_depth=2, fourier_features=1024, likelihood="bernoulli"),
    "cryoem": dict(image_size=100, rotations=8, z_dim=2, encoder_fields=128, encoder_kernel=56, encoder_padding=16,
                   generator_width=512, generator_depth=6, fourier_features=1024, likelihood="gaussian"),
}
BATCH = 100
GIB = 1 << 30


@dataclass
class Job:
    config: dict  # ModelConfig fields
    path: str  # 'naive' or 'fast'
    kind: str  # 'train' or 'infer'
    device: str
    batch: int
    warmup: int
    steps: int


def macs(config: ModelConfig, batch: int) -> dict:
    """Multiply-adds of one forward pass, by part, counting the encoder as escnn expands it to plain convolutions."""
    m = config.image_size + 2 * config.encoder_padding - config.encoder_kernel + 1
    channels = config.encoder_fields * config.rotations
    n_out = output_fields(config.z_dim, config.subpixel) * config.rotations
    cells = m * m * batch
    pixels = config.image_size ** 2 * batch
    width = config.generator_width
    return {
        "first_conv": channels * config.encoder_kernel ** 2 * cells,
        "pointwise": (2 * channels * channels + channels * n_out) * cells // (
            config.rotations if config.encoder_pointwise == "shared" else 1),
        "generator": pixels * (config.coordinate_inputs() * width + (config.generator_depth - 1) * width * width
                               + width),
    }


def step_macs(config: ModelConfig, batch: int, kind: str) -> float:
    parts = macs(config, batch)
    if kind == "infer":
        return parts["first_conv"] + parts["pointwise"]
    # backward ~2x forward; the first convolution needs only its filter gradient (the images are data)
    return 2 * parts["first_conv"] + 3 * (parts["pointwise"] + parts["generator"])


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Multiply-adds per second of a large square ``torch.mm`` (median of ``repeats``)."""
    size = 4096 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = [_timed(device, lambda: a @ b) for _ in range(repeats + 1)][1:]
    return size ** 3 / statistics.median(times)


def _timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_uses_bf16(device: torch.device) -> bool:
    return bf16_autocast_enabled("auto", device)


# --- one measurement, in its own process ---------------------------------------------------------------------

def measure(job: Job) -> dict:
    """Seconds per batch (median of ``job.steps``) and the process's peak memory for one job."""
    device = torch.device(job.device)
    torch.manual_seed(0)
    fast = job.path == "fast"
    config = ModelConfig(**job.config, kernels="fast" if fast else "reference")
    model = TargetVAE(config).to(device)
    images = _batch(config, job.batch, device)
    bf16 = fast and fast_uses_bf16(device)
    if job.kind == "train":
        step = _train_step(model, images, device, amp=bf16)
    else:
        model.eval()
        if fast:
            model.encoder.export()
        step = _encode_step(model, images, device, amp=bf16)
    times = [_timed(device, step) for _ in range(job.warmup + job.steps)][job.warmup:]
    result = {"seconds": statistics.median(times),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
              "mm_rate": matmul_rate(device, torch.bfloat16 if bf16 else torch.float32, repeats=3)}
    if device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return result


def _batch(config: ModelConfig, batch: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, config.image_size, config.image_size)
    if config.likelihood == "bernoulli":
        return torch.rand(shape, generator=generator).to(device)
    return torch.randn(shape, generator=generator).to(device)


def _train_step(model: TargetVAE, images: torch.Tensor, device: torch.device, amp: bool):
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    noise = torch.Generator(device=device).manual_seed(2)

    def step():
        with bf16_autocast(device, amp):
            loss = model.elbo(images, noise).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _encode_step(model: TargetVAE, images: torch.Tensor, device: torch.device, amp: bool):
    def step():
        with bf16_autocast(device, amp):
            model.encode(images)

    return step


def run_in_fresh_process(job: Job) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, job).result()


# --- the table -----------------------------------------------------------------------------------------------

def rows_for(config_name: str, device: torch.device, batch: int, quick: bool,
             paths: tuple = ("naive", "fast")) -> list[dict]:
    config = ModelConfig(**CONFIGS[config_name])
    rows = []
    for path in paths:
        bf16 = path == "fast" and fast_uses_bf16(device)
        row = {"config": config_name, "device": device.type, "path": path, "batch": batch,
               "precision": "bf16 autocast" if bf16 else "fp32"}
        for kind in ("train", "infer"):
            steps = (1 if quick else 2) if kind == "train" else (2 if quick else 4)
            job = Job(CONFIGS[config_name], path, kind, str(device), batch, warmup=1, steps=steps)
            print(f"  {config_name} {device.type} {path} {kind} (batch {batch}) ...", file=sys.stderr, flush=True)
            result = run_in_fresh_process(job)
            floor = step_macs(config, batch, kind) / result["mm_rate"]
            row[f"{kind}_ips"] = batch / result["seconds"]
            row[f"{kind}_floor"] = result["seconds"] / floor
            row[f"{kind}_mem"] = result.get("peak_gpu_gib", result["peak_rss_gib"])
            row[f"{kind}_tflops"] = 2 * result["mm_rate"] / 1e12
            print(f"    {result['seconds']:.2f} s/batch, {row[f'{kind}_floor']:.1f}x floor "
                  f"(mm {row[f'{kind}_tflops']:.2f} TFLOP/s), load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], memory_label: str) -> str:
    header = ("| config | device | path | batch | precision | train img/s | train x floor | "
              f"infer img/s | infer x floor | mm TFLOP/s train / infer | {memory_label} train (GiB) | "
              f"{memory_label} infer (GiB) | speed-up train / infer | memory train |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    naive = {}
    for row in rows:
        key = (row["config"], row["device"])
        if row["path"] == "naive":
            naive[key] = row
            ratios = "1 / 1"
            memory = "1"
        elif key in naive:
            base = naive[key]
            ratios = f"{row['train_ips'] / base['train_ips']:.1f}x / {row['infer_ips'] / base['infer_ips']:.1f}x"
            memory = f"{row['train_mem'] / base['train_mem']:.2f}x"
        else:  # --paths fast
            ratios = memory = "—"
        lines.append(f"| {row['config']} | {row['device']} | {row['path']} | {row['batch']} | "
                     f"{row['precision']} | {row['train_ips']:.1f} | {row['train_floor']:.1f} | "
                     f"{row['infer_ips']:.1f} | {row['infer_floor']:.1f} | "
                     f"{row['train_tflops']:.2f} / {row['infer_tflops']:.2f} | {row['train_mem']:.2f} | "
                     f"{row['infer_mem']:.2f} | {ratios} | {memory} |")
    return "\n".join(lines)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, "
            f"AMX-BF16 {'yes' if cpu_has_amx_bf16() else 'no'}, torch {torch.__version__}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 timed training step and 2 inference batches (default 2 and 4), after 1 warm-up each")
    parser.add_argument("--device", default="auto", help="auto (CPU, and the GPU when present), cpu or cuda")
    parser.add_argument("--configs", default="mnist,cryoem", help="comma-separated: mnist, cryoem")
    parser.add_argument("--cpu-cryoem-batch", type=int, default=10, help="batch of the cryo-EM configuration on CPU")
    parser.add_argument("--paths", default="naive,fast", help="comma-separated: naive, fast")
    parser.add_argument("--fourier-features", type=int,
                        help="the generator's Fourier features in every configuration (default: the paper's 1024)")
    parser.add_argument("--encoder-pointwise", choices=["group", "shared"],
                        help="the encoder's 1x1 layers in every configuration (default: ModelConfig's)")
    parser.add_argument("--fourier-random-phase", action="store_true", default=None,
                        help="phase-shifted cosines as the generator's inputs in every configuration")
    args = parser.parse_args(argv)
    for field, value in (("fourier_features", args.fourier_features), ("encoder_pointwise", args.encoder_pointwise),
                         ("fourier_random_phase", args.fourier_random_phase)):
        if value is not None:
            for config in CONFIGS.values():
                config[field] = value
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    start = time.perf_counter()
    load_before = os.getloadavg()
    for name in devices:
        device = torch.device(name)
        rates = {dtype: matmul_rate(device, dtype) for dtype in (torch.float32, torch.bfloat16)}
        rows = []
        for config_name in args.configs.split(","):
            batch = args.cpu_cryoem_batch if (config_name == "cryoem" and device.type == "cpu") else BATCH
            rows += rows_for(config_name, device, batch, args.quick, tuple(args.paths.split(",")))
        shown = ModelConfig(**CONFIGS["mnist"])
        inputs = "cos(2 pi B x + phi)" if shown.fourier_random_phase else "[cos, sin]"
        print(f"\n**{device.type}**, 1x1 layers {shown.encoder_pointwise}, {shown.fourier_features} Fourier "
              f"features as {inputs}: {machine_line(device)}; torch.mm rate fp32 "
              f"{2 * rates[torch.float32] / 1e12:.2f} TFLOP/s, bf16 {2 * rates[torch.bfloat16] / 1e12:.2f} TFLOP/s "
              "at the start (each row's floor uses the rate measured with it)\n")
        print(markdown(rows, "peak GPU memory" if device.type == "cuda" else "peak RSS"))
    print(f"\nload average (1, 5, 15 min) before {', '.join(f'{v:.1f}' for v in load_before)}, after "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; {time.perf_counter() - start:.0f} s in all"
          f"{' (--quick)' if args.quick else ''}")


if __name__ == "__main__":
    main()
