"""The model of paper section 3: equivariance, closed-form KL, gradients, and that it can learn."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from tvae_em.config import ModelConfig
from tvae_em.model import TargetVAE, posterior
from tvae_em.model.encoder import GroupConvEncoder
from tvae_em.model.generator import SpatialGenerator, pixel_coordinates, transform_coordinates
from tvae_em.model.kernels import StandardNormalKL
from tvae_em.model.plain_encoder import CellEncoder

torch.set_num_threads(1)


def _blob_image(n, seed):
    """A random smooth asymmetric object in the middle of an n x n box, zero near the border."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n))
    q = n // 4
    img[q:n - q, q:n - q] = rng.random((n - 2 * q, n - 2 * q))
    return torch.from_numpy(ndimage.gaussian_filter(img, 1.0)).float()[None, None]


@pytest.mark.parametrize("rotations,pointwise", [(4, "group"), (8, "group"), (16, "group"), (8, "shared")])
def test_encoder_rotating_input_by_90_degrees_rotates_map_and_shifts_rotation_axis(rotations, pointwise):
    torch.manual_seed(rotations)
    enc = GroupConvEncoder(rotations, z_dim=2, fields=3, kernel=7, padding=2, pointwise=pointwise).eval()
    image = _blob_image(17, rotations)
    out, out_rot = enc(image), enc(torch.rot90(image, 1, dims=(-2, -1)))
    for name in ("logits", "theta_mu", "z_mu"):
        before, after = getattr(out, name), getattr(out_rot, name)
        expected = torch.rot90(torch.roll(before, rotations // 4, dims=-3), 1, dims=(-2, -1))
        rel = (expected - after).abs().max() / after.abs().max()
        assert rel < 1e-3, (name, rel.item())  # float32


def test_encoder_shifting_input_shifts_map():
    torch.manual_seed(0)
    enc = GroupConvEncoder(8, z_dim=2, fields=3, kernel=7, padding=3).eval()
    image = torch.zeros(1, 1, 32, 32)
    image[..., 8:24, 8:24] = _blob_image(16, 3)[..., :, :]
    shifted = torch.roll(image, shifts=(3, -2), dims=(-2, -1))
    before, after = enc(image).logits, enc(shifted).logits
    # cells whose receptive field sees the same content in both images
    assert torch.allclose(after[..., 6:26, 4:24], before[..., 3:23, 6:26], atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_most_probable_z_invariant_and_pose_equivariant_under_rotation():
    torch.manual_seed(1)
    cfg = ModelConfig.preset("mnist", image_size=21, rotations=8, z_dim=3, encoder_fields=4, encoder_kernel=9,
                      encoder_padding=4, generator_width=16, fourier_features=8)
    model = TargetVAE(cfg).eval()
    image = _blob_image(21, 5)
    est, est_rot = model.encode(image), model.encode(torch.rot90(image, 1, dims=(-2, -1)))
    assert torch.allclose(est.z_mu, est_rot.z_mu, atol=1e-4)
    assert torch.allclose(est.entropy, est_rot.entropy, atol=1e-4)
    assert math.isclose(float((est_rot.theta - est.theta) % (2 * math.pi)), math.pi / 2, abs_tol=1e-5)
    # I'(x) = I(R(pi/2) x) has its object centre at t' = R(-pi/2) t = (t_y, -t_x); the grid centre is the
    # box's (N-1)/2 pixel, so compare positions relative to it.
    centre = model.grid[10, 10]
    t, t_rot = est.t[0] - centre, est_rot.t[0] - centre
    assert torch.allclose(t_rot, torch.stack([t[1], -t[0]]), atol=1e-5)


@pytest.mark.parametrize("angle,shift,tolerance,random_phase", [
    (math.pi / 2, (0.125, -0.25), 1e-4, False),  # on the pixel grid (3 and -6 px): exact
    (math.pi / 2, (0.125, -0.25), 1e-4, True),
    (0.7, (0.12, -0.08), 0.15, False),  # off the grid: bilinear resampling error only
])
def test_generator_is_equivariant_to_rotation_and_translation_of_coordinates(angle, shift, tolerance, random_phase):
    torch.manual_seed(0)
    n = 48
    gen = SpatialGenerator(z_dim=2, width=32, depth=2, fourier_features=16, fourier_scale=0.7,
                           random_phase=random_phase)
    z = torch.randn(1, 2)
    coords = pixel_coordinates(n)
    with torch.no_grad():
        canonical = gen(transform_coordinates(coords, torch.zeros(1), torch.zeros(1, 2)), z).view(n, n).numpy()
        posed = gen(transform_coordinates(coords, torch.tensor([angle]), torch.tensor([shift])), z).view(n, n)
    # resample the canonical image at R(theta)(x - t), in pixels
    rows, cols = np.mgrid[0:n, 0:n]
    x, y = cols - n // 2 - shift[0] * n / 2, rows - n // 2 - shift[1] * n / 2
    c, s = math.cos(angle), math.sin(angle)
    sampled = ndimage.map_coordinates(canonical, [s * x + c * y + n // 2, c * x - s * y + n // 2], order=1)
    inner = (slice(12, 36), slice(12, 36))
    spread = canonical.std()
    assert np.abs(sampled[inner] - posed.numpy()[inner]).max() < tolerance * spread
    assert np.abs(sampled[inner] - canonical[inner]).max() > 0.5 * spread  # the pose does change the image


def _random_encoder_output(b=2, r=4, m=3, z=2, subpixel=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    return posterior.EncoderOutput(
        logits=rnd(b, r, m, m), theta_mu=rnd(b, r, m, m, scale=0.3), theta_logstd=rnd(b, r, m, m, scale=0.3) - 1,
        z_mu=rnd(b, z, r, m, m), z_logstd=rnd(b, z, r, m, m, scale=0.3) - 0.5,
        shift_mu=rnd(b, 2, r, m, m, scale=0.05) if subpixel else None,
        shift_logstd=rnd(b, r, m, m, scale=0.2) - 3 if subpixel else None)


def test_kl_closed_form_matches_monte_carlo():
    r, m, n_img = 4, 3, 9
    enc = _random_encoder_output(r=r, m=m)
    priors = posterior.Priors(rotations=r, translation_std_px=2.0, shift_std_px=0.5)
    grid = GroupConvEncoder(r, 2, fields=1, kernel=7, padding=0).grid(n_img)
    log_q = posterior.log_q_tr(enc, posterior.log_prior_r(priors))
    log_p = posterior.log_prior_tr(priors, grid, n_img)
    closed = posterior.kl_divergence(enc, log_q, log_p, priors, n_img).total

    # Monte Carlo over the factorisation of eq. 3, independent of the closed form
    g = torch.Generator().manual_seed(1)
    samples = 200_000
    offsets = posterior.rotation_offsets(r)[None, :, None, None]
    normal = torch.distributions.Normal
    shift_mu = posterior.rotate_shift(enc.shift_mu)
    shift_std_model = 0.5 / (n_img / 2)
    for i in range(2):
        cell = torch.multinomial(log_q[i].exp().flatten(), samples, replacement=True, generator=g)
        pick = lambda x, cell=cell: x.flatten(-3)[..., cell]  # noqa: E731
        q_theta = normal(pick(enc.theta_mu[i] + offsets[0]), pick(enc.theta_logstd[i]).exp())
        q_z = normal(pick(enc.z_mu[i]), pick(enc.z_logstd[i]).exp())
        q_dt = normal(pick(shift_mu[i]), pick(enc.shift_logstd[i]).exp())
        theta, z, dt = q_theta.sample(), q_z.sample(), q_dt.sample()
        log_ratio = (pick(log_q[i]) - pick(log_p)
                     + q_theta.log_prob(theta) - normal(pick(offsets[0].expand(r, m, m)), math.pi / r).log_prob(theta)
                     + (q_z.log_prob(z) - normal(0.0, 1.0).log_prob(z)).sum(0)
                     + (q_dt.log_prob(dt) - normal(0.0, shift_std_model).log_prob(dt)).sum(0))
        mc = log_ratio.mean().item()
        assert abs(mc - closed[i].item()) < 0.02 * closed[i].item(), (mc, closed[i].item())


def test_fused_z_kl_and_weighted_sums_match_their_elementwise_definitions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    logstd = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    fused = StandardNormalKL.apply(mu, logstd)
    assert torch.allclose(fused, posterior.kl_normal(mu, logstd, 0.0, 1.0).sum(1))
    assert torch.autograd.gradcheck(StandardNormalKL.apply, (mu, logstd))

    w = torch.softmax(torch.randn(2, 100, generator=g), 1).view(2, 4, 5, 5)
    cells = torch.randn(2, 3, 4, 5, 5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the sums stay float32 under autocast
        summed, summed_one = posterior.weighted_sum(w, cells), posterior.weighted_sum(w, cells[:, 0])
    assert summed.dtype == torch.float32
    assert torch.allclose(summed, (w[:, None] * cells).flatten(2).sum(2), atol=1e-6)
    assert torch.allclose(summed_one, summed[:, 0])


def test_rotation_prior_normal_prefers_small_angles():
    priors = posterior.Priors(rotations=8, rotation_prior="normal")
    grid = torch.zeros(1, 1, 2)
    log_p = posterior.log_prior_tr(priors, grid, 10)[:, 0, 0]
    assert torch.isclose(log_p.exp().sum(), torch.tensor(1.0))
    assert log_p[0] > log_p[1] > log_p[2] and torch.isclose(log_p[1], log_p[7])


def _tiny_model(subpixel=False, likelihood="bernoulli"):
    cfg = ModelConfig.preset("mnist", image_size=20, rotations=4, z_dim=2, encoder_fields=4, encoder_kernel=9,
                      encoder_padding=2, generator_width=32, fourier_features=16, fourier_scale=0.1,
                      subpixel=subpixel, likelihood=likelihood, translation_prior_std=3.0)
    return TargetVAE(cfg)


@pytest.mark.parametrize("subpixel,likelihood", [(False, "bernoulli"), (True, "gaussian")])
def test_gradients_reach_every_parameter(subpixel, likelihood):
    torch.manual_seed(0)
    model = _tiny_model(subpixel, likelihood)
    model.elbo(torch.rand(3, 20, 20)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_single_batch_can_be_overfit():
    torch.manual_seed(0)
    model = _tiny_model()
    images = (_blob_image(20, 0)[0, 0] > 0.3).float().expand(4, 20, 20).clone()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        loss = model.elbo(images, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) / 4, (losses[:3], losses[-3:])


def test_encoder_export_gives_identical_outputs():
    torch.manual_seed(0)
    model = _tiny_model(subpixel=True).eval()
    images = torch.rand(3, 20, 20)
    before = model.encode(images)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.encoder.export()
    after = model.encode(images)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable  # a frozen copy
    for name in ("z_mu", "theta", "t", "entropy"):
        assert torch.allclose(getattr(before, name), getattr(after, name), atol=1e-5)
    model.train()
    assert model.encoder._exported is None


# --- issue 18's defects: each a regression test -------------------------------------------------------------

def test_coordinates_stay_float32_under_bfloat16_autocast():
    coords = pixel_coordinates(128)
    theta, t = torch.tensor([0.3, 2.9]), torch.tensor([[0.11, -0.2], [0.013, 0.4]])
    exact = transform_coordinates(coords.double(), theta.double(), t.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = transform_coordinates(coords, theta, t)
    assert autocast.dtype == torch.float32
    pixel = 2 / 128
    assert (autocast.double() - exact).abs().max() < 1e-4 * pixel


def test_theta_sample_split_across_the_seam_lands_between_the_two_bins():
    """q split between the last and the first rotation bin: every sample lies on the short arc between them."""
    r, m = 8, 3
    enc = _random_encoder_output(b=200, r=r, m=m, subpixel=False)
    enc.theta_mu.zero_()
    enc.theta_logstd.fill_(-20.0)  # no spread: theta is the averaged offset itself
    logits = torch.full((200, r, m, m), -1e4)
    logits[:, [0, r - 1], 1, 1] = 0.0
    log_q = torch.log_softmax(logits.flatten(1), 1).view_as(logits)
    draw = posterior.sample(enc, log_q, torch.zeros(m, m, 2), 1.0, torch.Generator().manual_seed(0))
    last = 2 * math.pi * (r - 1) / r
    on_arc = (torch.remainder(draw.theta, 2 * math.pi) >= last - 1e-5) | (draw.theta.abs() < 1e-5)
    assert on_arc.all(), draw.theta[~on_arc][:5]


@pytest.mark.parametrize("box", [32, 128])
def test_fourier_bandwidth_is_set_per_pixel_whatever_the_box(box):
    torch.manual_seed(0)
    config = ModelConfig.preset("mnist", image_size=box, encoder_fields=1, encoder_kernel=5, generator_width=8,
                         fourier_features=4096, fourier_scale=0.1)  # a small kernel: the encoder is not the point
    frequencies = TargetVAE(config).generator.fourier_b  # cycles per unit of the frame: box / 2 pixels
    cycles_per_px = frequencies / (box / 2)
    assert abs(cycles_per_px.std().item() - 0.1) < 0.005


def test_normal_rotation_prior_tilts_the_attention_over_rotations():
    """With flat attention logits q(r | y) is p(r) (the authors' code adds log p(r) to the logits)."""
    priors = posterior.Priors(rotations=8, rotation_prior="normal")
    enc = _random_encoder_output(b=1, r=8, m=3, subpixel=False)
    enc.logits.zero_()
    q_r = posterior.log_q_tr(enc, posterior.log_prior_r(priors)).exp().sum((2, 3))[0]
    p_r = posterior.log_prior_tr(priors, torch.zeros(3, 3, 2), 10).exp().sum((1, 2))
    assert torch.allclose(q_r, p_r, atol=1e-6)
    assert q_r[0] > q_r[1] > q_r[2]


@pytest.mark.parametrize("box", [32, 48, 50, 64, 100, 128])
def test_default_grid_has_a_cell_on_the_relion_box_centre(box):
    config = ModelConfig.preset("mnist", image_size=box, encoder_fields=1, generator_width=8, fourier_features=8)
    assert config.encoder_kernel % 2 == 1
    # the grid code both encoders share (GroupConvEncoder is a CellEncoder), without building escnn's filters
    grid = CellEncoder(8, 2, kernel=config.encoder_kernel, padding=config.encoder_padding, subpixel=False).grid(box)
    assert (grid.abs().sum(-1) == 0).sum() == 1  # one cell exactly at x = 0: pixel N//2, RELION's centre
    spacing = grid[0, 1, 0] - grid[0, 0, 0]
    assert math.isclose(spacing.item(), 2 / box, rel_tol=1e-6)


@pytest.mark.parametrize("true_x,true_y", [(0.0, 0.0), (0.3, -0.2), (-0.45, 0.5), (0.5, 0.0)])
def test_peak_offset_recovers_a_gaussian_peak_between_cells(true_x, true_y):
    m, centre = 9, 4
    rows, cols = torch.meshgrid(torch.arange(m).float(), torch.arange(m).float(), indexing="ij")
    log_q = -((cols - centre - true_x) ** 2 + (rows - centre - true_y) ** 2) / (2 * 0.8 ** 2)
    log_q = torch.log_softmax(log_q.flatten(), 0).view(1, m, m)
    best = log_q.flatten().argmax()
    offset = posterior.peak_offset(log_q, best[None] // m, best[None] % m)[0]
    position = torch.stack([best % m, best // m]).float() + offset - centre
    assert torch.allclose(position, torch.tensor([true_x, true_y]), atol=1e-4)


@pytest.mark.parametrize("kernel", [None, 18])  # the default (odd) and an even kernel, cells on half pixels
def test_centred_particle_gets_origin_zero_in_relion_convention(kernel):
    """An encoder whose q(t | y) peaks on RELION's box centre (pixel N//2): the written origin is 0, also when
    the centre falls between two cells (even kernels), where the MAP cell alone would say +-0.5 px."""
    from tvae_em.poses import model_to_relion

    box = 32
    model = TargetVAE(ModelConfig.preset("mnist", image_size=box, encoder_fields=1, encoder_kernel=kernel,
                                         generator_width=8, fourier_features=8)).eval()
    r, m = model.config.rotations, model.grid.shape[0]
    peaked = _random_encoder_output(b=1, r=r, m=m, subpixel=False)
    distance2_px = (model.grid ** 2).sum(-1) * (box / 2) ** 2
    peaked.logits = (-distance2_px / (2 * 1.5 ** 2)).expand(1, r, m, m).clone()
    model.encoder.forward = lambda images: peaked
    estimate = model.encode(torch.zeros(1, box, box))
    _, x_angst, y_angst = model_to_relion(estimate.theta.numpy(), estimate.t.numpy(), box, 1.0)
    assert abs(x_angst[0]) < 0.1 and abs(y_angst[0]) < 0.1, (x_angst, y_angst)
    whole_cell = model_to_relion(estimate.theta.numpy(), estimate.t_cell.numpy(), box, 1.0)[1]
    assert abs(whole_cell[0]) == (0.5 if kernel == 18 else 0.0)
