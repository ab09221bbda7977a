"""The encoder over a particle stack: the MAP cell of q(t, r | y) (paper section 3.2, ``TargetVAE.encode``) and
what the posterior says about it, for every particle, in batches.

Images are streamed batch by batch, the next read from disk while the current one is encoded, so memory holds two
batches of images and the result arrays.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tvae_em import console
from tvae_em.device import bf16_autocast, bf16_autocast_enabled, plan_threads, resolve_device, torch_threads
from tvae_em.errors import UsageError
from tvae_em.memory import FLOAT_BYTES, check_fits, model_bytes

ENCODED_FIELDS = ("z_mu", "z_std", "theta", "t", "entropy", "rotation_mass", "max_prob", "local_mass",
                  "translation_mass")


def encode_particles(model, particles, batch_size=256, device="auto", indices=None, amp="auto",
                     threads=None) -> dict:
    """Run the encoder over ``particles`` (all rows, or ``indices``) and return numpy arrays, one row each.

    ``amp``: bfloat16 autocast as in training (``device.bf16_autocast_enabled``); the poses and latents match
    float32's to bfloat16 rounding (tests/test_speed_paths.py).

    Keys: z_mu, z_std (n, Z); theta (n,) rad in [0, 2 pi); t (n, 2) model frame; entropy (n,) nats of
    q(t, r | y); rotation_mass (n, R); max_prob, local_mass, translation_mass (n,) (``PoseEstimate``). The
    next batch is read from disk while the current one is encoded, so at most two batches of images are in
    memory. ``threads``: CPUs for torch (default: those the process may use, ``device.cpu_budget``).
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    bf16 = bf16_autocast_enabled(amp, device)
    indices = np.arange(len(particles)) if indices is None else np.asarray(indices, dtype=np.int64)
    check_image_size(model, particles)
    check_fits(model_bytes(model.config, batch_size, activation_bytes=2 if bf16 else FLOAT_BYTES), device,
               f"encoding batches of {batch_size} particles", "use a smaller --batch-size")
    model.to(device).eval()
    model.encoder.export()
    cfg = model.config
    n = len(indices)
    results = {"z_mu": np.empty((n, cfg.z_dim), np.float32), "z_std": np.empty((n, cfg.z_dim), np.float32),
               "theta": np.empty(n, np.float32), "t": np.empty((n, 2), np.float32),
               "rotation_mass": np.empty((n, cfg.rotations), np.float32),
               **{name: np.empty(n, np.float32) for name in ("entropy", "max_prob", "local_mass",
                                                             "translation_mass")}}
    plan = plan_threads(threads)
    console.detail(f"encoding {n} particles on {device} in batches of {batch_size}, bfloat16 autocast "
                   f"{'on' if bf16 else 'off'}, {plan.describe()}")
    with ThreadPoolExecutor(max_workers=1) as reader, torch.no_grad(), torch_threads(plan.threads), \
            console.progress(n, "encoding", "particle") as progress:
        pending = reader.submit(particles.read, indices[:batch_size]) if n else None
        for start in range(0, n, batch_size):
            images = pending.result()
            following = start + batch_size
            if following < n:
                pending = reader.submit(particles.read, indices[following:following + batch_size])
            with bf16_autocast(device, bf16):
                estimate = model.encode(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))
            for name in ENCODED_FIELDS:
                results[name][start:start + len(images)] = getattr(estimate, name).float().cpu().numpy()
            progress.update(len(images))
    return results


def check_image_size(model, particles) -> None:
    """The encoder's translation grid is built for one box size; other boxes would give meaningless poses."""
    if particles.box != model.config.image_size:
        raise UsageError(f"the model was trained on {model.config.image_size} px images but the particles "
                         f"are {particles.box} px; preprocess them to the model's box first")
