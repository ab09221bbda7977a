"""What modelling the CTF costs a training step (issue 13: target under 10 %, on CPU and on GPU).

For each configuration, the same model is timed twice on the same batch of images: without a CTF, and with the
CTF as ``tvae-em train`` applies it: every particle's transfer function computed from its parameters
(``ctf.transfer``) and the posed generator images multiplied by it in Fourier space (``TargetVAE.elbo``). A step is
ELBO forward + backward + Adam step; the median of ``--steps`` after one warm-up.

    python benchmarks/ctf_cost.py [--device auto|cpu|cuda] [--steps 5]
"""

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from tvae_em import ctf, simulate
from tvae_em.config import ModelConfig
from tvae_em.device import bf16_autocast, bf16_autocast_enabled, resolve_device
from tvae_em.model import TargetVAE

CONFIGS = {  # name: (model, batch)
    "demo, 32 px": (dict(image_size=32, encoder_fields=16, generator_width=128, generator_depth=3,
                         fourier_features=64, fourier_scale=0.0625), 32),
    "cryo-EM small, 48 px": (dict(image_size=48, encoder_fields=16, generator_width=128, generator_depth=3,
                                  fourier_features=128), 32),
    "paper cryo-EM, 100 px": (dict(image_size=100, generator_depth=6), 8),
}


def step_seconds(model: TargetVAE, images: torch.Tensor, params: torch.Tensor | None, device: torch.device,
                 steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    noise = torch.Generator(device=device).manual_seed(0)
    amp = bf16_autocast_enabled("auto", device)
    times = []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        transfer = None if params is None else ctf.transfer(params, images.shape[-1], "full")
        with bf16_autocast(device, amp):
            loss = model.elbo(images, noise, transfer).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(name: str, device: torch.device, steps: int) -> dict:
    options, batch = CONFIGS[name]
    data = simulate.simulate_particles(batch, box=options["image_size"], n_objects=1, seed=0,
                                       defocus_um=(1.0, 2.5))
    images = torch.from_numpy(data["images"] / data["images"].std()).to(device)
    params = torch.from_numpy(np.asarray(data["ctf"])).to(device)
    seconds = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = TargetVAE(ModelConfig(**options, likelihood="gaussian", ctf=mode)).to(device)
        seconds[mode] = step_seconds(model, images, params if mode == "full" else None, device, steps)
    return {"config": name, "batch": batch, "without": seconds["none"], "with": seconds["full"],
            "overhead": seconds["full"] / seconds["none"] - 1}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    lines = [f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
             "", "| configuration | batch | step without CTF (s) | with CTF (s) | CTF overhead |",
             "| --- | --- | --- | --- | --- |"]
    for name in args.configs:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        row = measure(name, device, args.steps)
        lines.append(f"| {row['config']} | {row['batch']} | {row['without']:.3f} | {row['with']:.3f} | "
                     f"{100 * row['overhead']:+.1f} % |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
