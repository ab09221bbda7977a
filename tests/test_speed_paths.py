"""The fast kernels (``ModelConfig.kernels = "fast"``, tvae_em/model/kernels.py) compute what the reference code
computes.

- a whole model: the same ELBO and gradients with either kernels;
- plain-torch encoder layers on escnn's expanded filters == escnn's own modules (outputs and gradients);
- the exported encoder == escnn in inference (same poses and latents on real MNIST digits);
- FourierLinear (chunked, recomputing features in backward) == materialised features + nn.Linear (float64);
- the first layer's unfolded filter gradient == conv2d's, across several chunks of images;
- bfloat16 autocast: ELBO of one batch and a short training curve within tolerance of float32, and phases kept in
  float32 (a bfloat16 phase would be off by ~0.3 rad at the paper's Fourier scale).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tvae_em import device as device_module
from tvae_em.config import ModelConfig
from tvae_em.device import torch_threads
from tvae_em.io.mnist import load_mnist
from tvae_em.model import TargetVAE
from tvae_em.model import kernels as kernels_module
from tvae_em.model import plain_encoder as plain_encoder_module
from tvae_em.model.generator import SpatialGenerator
from tvae_em.model.kernels import FourierLinear
from tvae_em.simulate import make_mnist_variant, make_shapes

SMALL = dict(image_size=28, rotations=8, encoder_fields=4, encoder_kernel=15, encoder_padding=4, generator_width=32,
             fourier_features=64, fourier_scale=0.2, likelihood="bernoulli", generator_depth=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on 2 threads stall on a busy shared machine; one thread keeps this file fast and deterministic."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """32 real MNIST(U) digits, 28 x 28, in [0, 1]."""
    images, labels = load_mnist(mnist_dir)
    data = make_mnist_variant(images[:32], labels[:32], "U", size=28, seed=0, shift_std_px=2.0)
    return torch.from_numpy(np.asarray(data["images"], np.float32)).clamp(0, 1)


@pytest.fixture(scope="module")
def shapes():
    """8 generated letter shapes, 28 x 28, in [0, 1]: the kernels' equivalence needs no data from outside."""
    return torch.from_numpy(np.asarray(make_shapes(8, size=28, seed=0)["images"], np.float32))


def _model(**options) -> TargetVAE:
    torch.manual_seed(0)
    return TargetVAE(ModelConfig(**{**SMALL, **options}))


def _twins(**options) -> tuple[TargetVAE, TargetVAE]:
    """The same model (the same weights) with the reference kernels and with the fast ones."""
    reference, fast = _model(kernels="reference", **options), _model(kernels="fast", **options)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


@pytest.mark.parametrize("options", [{}, dict(subpixel=True, encoder_pointwise="shared", fourier_random_phase=True)])
def test_a_model_with_fast_kernels_has_the_elbo_and_gradients_of_the_reference(shapes, options):
    results = []
    for model in _twins(**options):
        terms = model.elbo(shapes, torch.Generator().manual_seed(0))
        terms.loss.backward()
        grads = {name: parameter.grad for name, parameter in model.named_parameters()}
        results.append((terms.elbo.detach(), terms.kl.z.detach(), grads))
    (elbo, kl_z, grads), (fast_elbo, fast_kl_z, fast_grads) = results
    assert torch.allclose(fast_elbo, elbo, rtol=1e-5) and torch.allclose(fast_kl_z, kl_z, rtol=1e-5)
    assert grads.keys() == fast_grads.keys()
    for name, grad in grads.items():  # float32 sums in other orders, through the whole model
        assert (fast_grads[name] - grad).abs().max() <= 1e-3 * grad.abs().max(), name


@pytest.mark.parametrize("pointwise", ["group", "shared"])
def test_plain_encoder_layers_match_escnn_modules_and_their_gradients(shapes, pointwise):
    outputs, grads = [], []
    for model in _twins(subpixel=True, encoder_pointwise=pointwise):
        out = model.encoder(shapes[:, None])
        fields = torch.cat([out.logits, out.theta_mu, out.z_mu.flatten(1, 2), out.shift_mu.flatten(1, 2)], 1)
        (fields * torch.linspace(-1, 1, fields.shape[1])[:, None, None]).sum().backward()
        outputs.append(fields.detach())
        grads.append([p.grad.clone() for p in model.encoder.parameters()])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    # float32 sums in another order: relative to the scale. A shared layer's bias gradient sums r times more
    # terms (every rotation of every cell), which cancel; in float64 both kinds agree to 1e-8.
    tolerance = 1e-5 if pointwise == "group" else 1e-4
    for reference, plain in zip(*grads, strict=True):
        assert (reference - plain).abs().max() <= tolerance * reference.abs().max()


def test_rotation_shared_layers_are_group_convolutions_with_kron_filters():
    """The shared layers' claim: a matrix W applied to every rotation alike is the full 1x1 group convolution
    whose filter is kron(W, I_r), in float64, whatever the first layer's bias and the batch."""
    torch.manual_seed(0)
    rotations, fields, images = 8, 3, torch.rand(2, 1, 12, 12, dtype=torch.float64)
    first = (torch.randn(fields * rotations, 1, 5, 5, dtype=torch.float64), torch.randn(fields * rotations,
                                                                                         dtype=torch.float64))
    shared = [(torch.randn(n_out, n_in, 1, 1, dtype=torch.float64), torch.randn(n_out, dtype=torch.float64))
              for n_in, n_out in ((fields, fields), (fields, fields), (fields, 5))]
    identity = torch.eye(rotations, dtype=torch.float64)
    full = [(torch.kron(w[..., 0, 0], identity)[..., None, None], b.repeat_interleave(rotations)) for w, b in shared]
    expected = plain_encoder_module.plain_group_conv(images, [first, *full], padding=1)
    got = plain_encoder_module.plain_group_conv(images, [first, *shared], padding=1, shared_over=rotations)
    assert got.shape == expected.shape == (2, 5 * rotations, 10, 10)
    assert torch.allclose(got, expected.float(), atol=1e-6)


def test_exported_encoder_gives_escnn_poses_and_latents_on_mnist(digits):
    reference_model, model = (twin.eval() for twin in _twins())
    reference = reference_model.encode(digits)
    model.encoder.export()
    exported = model.encode(digits)
    assert model.encoder._exported is not None
    assert torch.equal(reference.t, exported.t)  # the same most probable cell for every digit
    for name in ("theta", "z_mu", "z_std", "entropy", "rotation_mass", "max_prob"):
        assert torch.allclose(getattr(reference, name), getattr(exported, name), atol=1e-5), name


@torch.no_grad()
def test_bf16_inference_keeps_the_posterior_outputs_in_float32(digits):
    model = _model().eval()
    model.encoder.export()
    reference = model.encoder(digits[:, None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model.encoder(digits[:, None])
    assert fast.logits.dtype == torch.float32  # the output layer ran in float32
    for name in ("logits", "theta_mu", "z_mu"):
        ours, ref = getattr(fast, name), getattr(reference, name)
        error = (ours - ref).abs() / ref.std()  # bfloat16 rounding of the hidden layers only
        assert error.mean() < 0.02 and error.max() < 0.1, name


@pytest.mark.parametrize("random_phase", [False, True])
def test_fourier_linear_equals_materialised_features_in_float64(monkeypatch, random_phase):
    monkeypatch.setattr(kernels_module, "CHUNK_VALUES", 7 * 16)  # 7 pixels per chunk: many chunks, one partial
    torch.manual_seed(0)
    layer = SpatialGenerator(z_dim=2, width=8, fourier_features=16, fourier_scale=3.0,
                             random_phase=random_phase).double()
    coords = (torch.rand(3, 20, 2, dtype=torch.float64) * 2.8 - 1.4).requires_grad_()
    weight, bias, phases = layer.coord_layer.weight, layer.coord_layer.bias, layer.fourier_phase
    assert weight.shape == (8, 16 if random_phase else 32)
    upstream = torch.randn(3, 20, 8, dtype=torch.float64)

    fused = FourierLinear.apply(coords, layer.fourier_b, weight, bias, phases)
    fused_grads = torch.autograd.grad(fused, (coords, weight, bias), upstream)
    plain = layer.coord_layer(layer.features(coords))
    plain_grads = torch.autograd.grad(plain, (coords, weight, bias), upstream)
    assert torch.allclose(fused, plain, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(lambda c, w, b: FourierLinear.apply(c, layer.fourier_b, w, b, phases),
                                    (coords[:1, :9].detach().requires_grad_(), weight, bias))


@pytest.mark.parametrize("random_phase", [False, True])
def test_generator_paths_agree_in_float32(random_phase):
    torch.manual_seed(0)
    fast = SpatialGenerator(z_dim=2, width=32, depth=3, fourier_features=64, random_phase=random_phase)
    reference = SpatialGenerator(z_dim=2, width=32, depth=3, fourier_features=64, random_phase=random_phase,
                                 fast=False)
    reference.load_state_dict(fast.state_dict())
    coords, z = torch.rand(4, 50, 2) * 2 - 1, torch.randn(4, 2)
    assert torch.allclose(fast(coords, z), reference(coords, z), atol=1e-5)


def test_first_layer_filter_gradient_matches_conv2d_across_chunks(monkeypatch):
    monkeypatch.setattr(kernels_module, "_UNFOLDED_VALUES", 2 * 25 * 12 * 12)  # 2 images per chunk, 5 images
    torch.manual_seed(0)
    images = torch.rand(5, 1, 12, 12, dtype=torch.float64).to(memory_format=torch.channels_last)
    weight = torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 6, 12, 12, dtype=torch.float64)
    out = kernels_module.BigKernelConv.apply(images, weight, bias, 2)
    grads = torch.autograd.grad(out, (weight, bias), upstream)
    reference = F.conv2d(images, weight, bias, padding=2)
    reference_grads = torch.autograd.grad(reference, (weight, bias), upstream)
    assert torch.allclose(out, reference, atol=1e-12)
    for a, b in zip(grads, reference_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def _elbo(model, images, amp, seed=0):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        return model.elbo(images, torch.Generator().manual_seed(seed))


def test_bf16_autocast_elbo_of_a_batch_is_close_to_float32(digits):
    model = _model()
    full, half = _elbo(model, digits, amp=False), _elbo(model, digits, amp=True)
    assert abs(half.elbo.item() - full.elbo.item()) < 2e-3 * abs(full.elbo.item())
    assert abs(half.kl.total.mean().item() - full.kl.total.mean().item()) < 0.05 * full.kl.total.mean().item()


def test_bf16_training_curve_tracks_float32(digits):
    curves = []
    for amp in (False, True):
        model = _model()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        curve = []
        for step in range(15):
            terms = _elbo(model, digits, amp, seed=step)
            optimizer.zero_grad()
            terms.loss.backward()
            optimizer.step()
            curve.append(terms.elbo.item())
        curves.append(np.array(curve))
    full, half = curves
    assert full[-1] > full[0] + 50  # it does learn, so the comparison means something
    assert np.all(np.abs(half - full) < 0.01 * np.abs(full)), (full, half)


@pytest.mark.parametrize("random_phase", [False, True])
def test_fused_bf16_features_keep_float32_phases(random_phase):
    """At the paper's scale phases reach ~100 rad; computed in bfloat16 they would be off by up to ~0.3 rad."""
    torch.manual_seed(0)
    gen = SpatialGenerator(z_dim=2, width=64, fourier_features=256, fourier_scale=3.0, random_phase=random_phase)
    coords = torch.rand(2, 400, 2) * 2.8 - 1.4
    w, b, phases = gen.coord_layer.weight, gen.coord_layer.bias, gen.fourier_phase
    exact = FourierLinear.apply(coords.double(), gen.fourier_b.double(), w.double(), b.double(),
                                None if phases is None else phases.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = FourierLinear.apply(coords, gen.fourier_b, w, b, phases)
    assert fast.dtype == torch.bfloat16
    error = (fast.double() - exact).abs().max() / exact.abs().max()
    assert error < 0.02


@pytest.mark.parametrize("has_amx, device, mode, expected", [
    (True, "cpu", "auto", True), (False, "cpu", "auto", False), (True, "cpu", "off", False),
    (False, "cpu", "bf16", True),
])
def test_amp_auto_uses_bf16_on_cpus_with_amx(monkeypatch, has_amx, device, mode, expected):
    monkeypatch.setattr(device_module, "cpu_has_amx_bf16", lambda: has_amx)
    assert device_module.bf16_autocast_enabled(mode, torch.device(device)) is expected


def test_amx_flag_is_read_from_cpuinfo():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert device_module.cpu_has_amx_bf16() is ("amx_bf16" in flags.split())
