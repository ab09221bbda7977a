"""Plain VAE / beta-VAE baselines of Table 2: shapes, gradients, ELBO arithmetic and parameter sizing."""

import pytest
import torch

from tvae_em.model.baselines import MLPVAE, count_parameters, fit, hidden_for_parameters

SIZE = 12


def _images(n=6, seed=0):
    return torch.rand(n, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_elbo_is_finite_and_every_parameter_gets_a_gradient():
    model = MLPVAE(SIZE, z_dim=4, hidden=16)
    terms = model.elbo(_images(), torch.Generator().manual_seed(1))
    assert torch.isfinite(terms.elbo) and terms.kl >= 0 and terms.reconstruction < 0
    terms.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_beta_weighs_only_the_kl_in_the_loss():
    plain, beta = MLPVAE(SIZE, hidden=8), MLPVAE(SIZE, hidden=8, beta=4.0)
    beta.load_state_dict(plain.state_dict())
    images = _images()
    a = plain.elbo(images, torch.Generator().manual_seed(3))
    b = beta.elbo(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.elbo, b.elbo)
    torch.testing.assert_close(b.loss, 4.0 * a.kl - a.reconstruction)
    torch.testing.assert_close(a.loss, -a.elbo)


def test_encode_and_decode_shapes():
    model = MLPVAE(SIZE, z_dim=3, hidden=8).eval()
    estimate = model.encode(_images(5))
    assert estimate.z_mu.shape == (5, 3) and (estimate.z_std > 0).all()
    out = model.decode(estimate.z_mu)
    assert out.shape == (5, SIZE, SIZE) and ((out >= 0) & (out <= 1)).all()


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("hidden", [1, 7, 40])
def test_parameter_formula_is_exact(hidden, depth):
    count = count_parameters(MLPVAE(SIZE, z_dim=4, hidden=hidden, depth=depth))
    assert hidden_for_parameters(SIZE, 4, count, depth) == hidden


def test_hidden_for_parameters_lands_near_the_target():
    target = 232_008
    hidden = hidden_for_parameters(50, 4, target)
    count = count_parameters(MLPVAE(50, z_dim=4, hidden=hidden))
    assert abs(count - target) < count_parameters(MLPVAE(50, z_dim=4, hidden=1))  # within one unit's worth


def test_fit_improves_the_elbo():
    torch.manual_seed(0)
    images = (_images(200) > 0.7).float()
    model = MLPVAE(SIZE, z_dim=2, hidden=32)
    history = fit(model, images, epochs=8, lr=3e-3, batch_size=50)
    assert len(history) == 8 and history[-1] > history[0] + 5
    assert not model.training
