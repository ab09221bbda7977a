"""Section 4.2 in miniature: a short CPU training run recovers the rotation and translation of asymmetric
shapes without supervision, scored with the paper's protocol (prediction on the transformed image relative to
the prediction on the untransformed, centred one)."""

import torch

from tvae_em.metrics import circular_correlation, relative_pose, translation_correlation
from tvae_em.model import ModelConfig, TargetVAE
from tvae_em.simulate import make_shapes

SIZE = 32
SHIFT_STD_PX = 3.0


def _train(model, images, epochs=8, anneal_at=5, batch=50, seed=0):
    """Adam at 1e-3, then 2e-4 for the last epochs (a short run needs the larger step to get going and the
    smaller one to settle)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if epoch == anneal_at:
            for group in opt.param_groups:
                group["lr"] = 2e-4
        for batch_rows in torch.randperm(len(images), generator=g).split(batch):
            loss = model.elbo(images[batch_rows], generator=g).loss
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_short_training_recovers_rotation_and_translation_of_shapes():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = make_shapes(600, size=SIZE, seed=0, shift_std_px=SHIFT_STD_PX, height_fraction=0.65)
    images = torch.from_numpy(data["images"]).clamp(0, 1)
    config = ModelConfig(image_size=SIZE, rotations=8, z_dim=2, encoder_fields=16, generator_width=128,
                         generator_depth=2, fourier_features=128, fourier_scale=0.125,
                         translation_prior_std=SHIFT_STD_PX)
    model = TargetVAE(config)
    _train(model, images)

    model.eval()
    posed = model.encode(images)
    canonical = model.encode(torch.from_numpy(data["canonical"]).clamp(0, 1))
    theta, t = relative_pose(posed.theta.numpy(), posed.t.numpy(), canonical.theta.numpy(),
                             canonical.t.numpy())
    rotation = circular_correlation(data["theta"], theta)
    r_x, r_y = translation_correlation(data["t_model"], t)
    assert rotation > 0.8, rotation
    assert r_x > 0.9 and r_y > 0.9, (r_x, r_y)
