"""Baselines of the paper's Table 2: a plain VAE (Kingma & Welling, ref. [3]) and the beta-VAE (Higgins et al.,
ref. [4]), with MLP encoder and decoder and Bernoulli pixels.

They expose the surface the benchmarks use on TARGET-VAE: ``elbo(images, generator) -> terms`` with ``.loss``
and ``encode(images) -> estimate`` with ``.z_mu``. They have no pose latents, so as in the paper they get a
larger z (4) and are compared at a parameter count close to the TARGET-VAE they stand beside
(``hidden_for_parameters``).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAETerms:
    """Batch means of the ELBO parts; ``loss`` weighs the KL by beta (beta = 1: the plain VAE's -ELBO)."""

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    beta: float

    @property
    def loss(self) -> torch.Tensor:
        return self.beta * self.kl - self.reconstruction


@dataclass
class VAEEstimate:
    z_mu: torch.Tensor  # (B, Z)
    z_std: torch.Tensor  # (B, Z)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.LeakyReLU()]
    return nn.Sequential(*layers[:-1])  # no activation on the output layer


class MLPVAE(nn.Module):
    """VAE with ``depth`` hidden layers of ``hidden`` units in encoder and decoder; beta > 1: beta-VAE."""

    def __init__(self, image_size: int, z_dim: int = 4, hidden: int = 512, depth: int = 2, beta: float = 1.0):
        super().__init__()
        pixels = image_size * image_size
        self.image_size, self.z_dim, self.beta = image_size, z_dim, beta
        self.encoder = _mlp([pixels] + [hidden] * depth + [2 * z_dim])
        self.decoder = _mlp([z_dim] + [hidden] * depth + [pixels])

    def _posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.encoder(images.flatten(1)).chunk(2, dim=1)
        return mu, log_std

    def elbo(self, images: torch.Tensor, generator: torch.Generator | None = None) -> VAETerms:
        """One reparameterised sample of E_q log p(y|z) minus the closed-form KL to N(0, I), batch means."""
        mu, log_std = self._posterior(images)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        logits = self.decoder(mu + noise * log_std.exp())
        recon = -F.binary_cross_entropy_with_logits(logits, images.flatten(1), reduction="none").sum(1)
        kl = 0.5 * (mu**2 + (2 * log_std).exp() - 1 - 2 * log_std).sum(1)
        return VAETerms(elbo=(recon - kl).mean(), reconstruction=recon.mean(), kl=kl.mean(), beta=self.beta)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> VAEEstimate:
        mu, log_std = self._posterior(images)
        return VAEEstimate(z_mu=mu, z_std=log_std.exp())

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli means (B, N, N)."""
        return torch.sigmoid(self.decoder(z)).view(-1, self.image_size, self.image_size)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def hidden_for_parameters(image_size: int, z_dim: int, target: int, depth: int = 2) -> int:
    """Hidden width at which an ``MLPVAE`` has about ``target`` parameters (at least 1 unit).

    Encoder and decoder together hold 2 (depth - 1) h^2 + (2 P + 3 z + 2 depth) h + P + 2 z parameters
    for P pixels and width h; the positive root of that quadratic, rounded, is the answer.
    """
    pixels = image_size * image_size
    a = 2 * (depth - 1)
    b = 2 * pixels + 3 * z_dim + 2 * depth
    c = pixels + 2 * z_dim - target
    root = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return max(1, round(root))


def fit(model: MLPVAE, images: torch.Tensor, epochs: int, lr: float, batch_size: int = 100, seed: int = 0,
        progress=None) -> list[float]:
    """Adam on the (beta-weighted) -ELBO over shuffled batches; returns the mean training ELBO per epoch.

    ``progress`` (optional) is called with (epoch, mean ELBO) after every epoch.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for rows in torch.randperm(len(images), generator=generator).split(batch_size):
            terms = model.elbo(images[rows], generator)
            optimiser.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimiser.step()
            total += terms.elbo.item() * len(rows)
        history.append(total / len(images))
        if progress is not None:
            progress(epoch, history[-1])
    model.eval()
    return history
