"""The GPU path: training, checkpoints and encoding on a CUDA device with the autocast the CLI uses there.

Marked ``gpu``: they run on ``TVAE_TEST_DEVICE`` (default ``cuda``, skipped where none is visible), so that
``benchmarks/gpu_check.sh`` runs them on a lent GPU and ``TVAE_TEST_DEVICE=cpu`` on any machine
(tests/test_gpu_check.py), which keeps them from rotting while no GPU is at hand.
"""

import os

import numpy as np
import pytest
import torch

from tvae_em import checkpoint as ckpt
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.encode import encode_particles
from tvae_em.io.stack import ArrayParticles
from tvae_em.train import train

pytestmark = pytest.mark.gpu
SMALL = dict(image_size=24, rotations=4, z_dim=2, encoder_fields=4, encoder_kernel=13, generator_width=32,
             generator_depth=2, fourier_features=32, likelihood="gaussian")


@pytest.fixture
def device() -> str:
    name = os.environ.get("TVAE_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (set TVAE_TEST_DEVICE=cpu to run the GPU tests on the CPU)")
    return name


def particles(n=64, size=24) -> ArrayParticles:
    """Normalised Gaussian blobs off-centre, so that the pose posterior has something to find."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size] - size // 2
    centres = rng.uniform(-3, 3, (n, 2))
    images = np.exp(-((x - centres[:, :1, None]) ** 2 / 8 + (y - centres[:, 1:, None]) ** 2 / 3))
    images += 0.3 * rng.standard_normal(images.shape)
    return ArrayParticles(((images - images.mean()) / images.std()).astype(np.float32))


def test_training_on_the_device_saves_a_checkpoint_that_loads_anywhere(device, tmp_path):
    result = train(ModelConfig(**SMALL), TrainConfig(batch_size=16, epochs=2, device=device, progress=False),
                   particles(), tmp_path)
    assert result.epochs == 2 and np.isfinite(result.metrics["train_elbo"])
    model, _ = ckpt.load_model(tmp_path, map_location=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_encoding_on_the_device_matches_the_cpu(device, tmp_path):
    """float32 on both: the same poses and latents within float rounding (GPU reductions differ in order)."""
    model = ckpt.build_model(ModelConfig(**SMALL), seed=0)
    data = particles()
    on_cpu = encode_particles(model, data, batch_size=16, device="cpu", amp="off")
    on_device = encode_particles(model, data, batch_size=16, device=device, amp="off")
    np.testing.assert_allclose(on_device["z_mu"], on_cpu["z_mu"], atol=1e-4)
    np.testing.assert_allclose(on_device["t"], on_cpu["t"], atol=1e-4)
    angle_gap = np.angle(np.exp(1j * (on_device["theta"] - on_cpu["theta"])))
    assert np.abs(angle_gap).max() < 1e-3


def test_bf16_encoding_on_the_device_keeps_the_cells(device):
    """bfloat16 autocast (what 'auto' picks on CUDA) chooses the same pose cells as float32 for nearly all."""
    model = ckpt.build_model(ModelConfig(**SMALL), seed=0)
    data = particles()
    full = encode_particles(model, data, batch_size=16, device=device, amp="off")
    half = encode_particles(model, data, batch_size=16, device=device, amp="bf16")
    same_cell = np.all(np.abs(full["t"] - half["t"]) < 0.5 / SMALL["image_size"], axis=1)
    assert same_cell.mean() >= 0.9
