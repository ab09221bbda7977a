"""Approximate posterior, priors and KL divergence (paper section 3.2, equations 3-5).

q(z, theta, t, r | y) = q(z | t, r, y) q(theta | t, r, y) q(t, r | y)                                  (eq. 3)
    q(t, r | y)          = softmax over all cells (r', i, j) of the attention logits a(y)
    q(theta | t, r, y)   = N(mu_theta + 2 pi r'/R, sigma_theta^2)
    q(z | t, r, y)       = N(mu_z, sigma_z^2)
KL(q || p) = KL_{t,r} + sum_{t,r} q(t, r | y) (KL_theta + KL_z)                                       (eq. 5)
with p(t, r) = p(t) p(r) (discretised Gaussian on the grid x uniform or discretised-normal p(r)),
p(theta | r) = N(2 pi r'/R, (pi/R)^2) and p(z) = N(0, I). Every KL is in closed form.

Beyond the paper (optional, ``EncoderOutput.shift_mu`` present): a continuous translation offset per cell,
q(dt | t, r, y) = N(R(-2 pi r'/R) mu_dt, sigma_dt^2 I) with prior N(0, s^2 I); its KL joins KL_theta and KL_z
inside the q(t, r) weighted sum, and the translation becomes grid(t) + dt (sub-pixel).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tvae_em.model.encoder import EncoderOutput


@dataclass
class Priors:
    """Prior hyper-parameters. Translation std is in pixels of the input image."""

    rotations: int
    translation_std_px: float = 5.0
    rotation_prior: str = "uniform"  # or "normal": discretised N(0, rotation_prior_std^2) over the offsets
    rotation_prior_std_rad: float = math.pi / 4
    theta_std_rad: float | None = None  # std of p(theta | r); the paper's pi / R when None
    shift_std_px: float = 0.5  # sub-pixel offset prior

    def theta_std(self) -> float:
        return self.theta_std_rad if self.theta_std_rad is not None else math.pi / self.rotations


def rotation_offsets(rotations: int, device=None) -> torch.Tensor:
    """theta_offset = 2 pi r' / R for r' = 0..R-1, the rotation of each discrete group element."""
    return torch.arange(rotations, device=device, dtype=torch.float32) * (2 * math.pi / rotations)


def log_prior_tr(priors: Priors, grid: torch.Tensor, image_size: int) -> torch.Tensor:
    """log p(t, r) = log p(t) + log p(r), normalised over all cells: (R, M, M)."""
    std_model = priors.translation_std_px / (image_size / 2)
    log_pt = -(grid ** 2).sum(-1) / (2 * std_model ** 2)
    offsets = rotation_offsets(priors.rotations, grid.device)
    if priors.rotation_prior == "uniform":
        log_pr = torch.zeros_like(offsets)
    elif priors.rotation_prior == "normal":
        wrapped = torch.remainder(offsets + math.pi, 2 * math.pi) - math.pi
        log_pr = -wrapped ** 2 / (2 * priors.rotation_prior_std_rad ** 2)
    else:
        raise ValueError(f"unknown rotation prior {priors.rotation_prior!r}")
    joint = log_pr[:, None, None] + log_pt[None]
    return joint - torch.logsumexp(joint.flatten(), 0)


def log_q_tr(enc: EncoderOutput) -> torch.Tensor:
    """log q(t, r | y): softmax over all (r', i, j) of the attention logits, (B, R, M, M)."""
    b = enc.logits.shape[0]
    return F.log_softmax(enc.logits.reshape(b, -1).float(), dim=1).view_as(enc.logits)


def kl_normal(mu_q, logstd_q, mu_p, std_p) -> torch.Tensor:
    """KL(N(mu_q, exp(logstd_q)^2) || N(mu_p, std_p^2)), elementwise, closed form."""
    var_ratio = torch.exp(2 * logstd_q) / std_p ** 2
    return 0.5 * (var_ratio + (mu_q - mu_p) ** 2 / std_p ** 2 - 1 - torch.log(var_ratio))


@dataclass
class KLTerms:
    """Per-image terms of equation 5, each shaped (B,)."""

    tr: torch.Tensor
    theta: torch.Tensor
    z: torch.Tensor
    shift: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.tr + self.theta + self.z + self.shift


def kl_divergence(enc: EncoderOutput, log_q: torch.Tensor, log_p: torch.Tensor, priors: Priors,
                  image_size: int) -> KLTerms:
    """Equation 5: KL_{t,r} + sum_{t,r} q(t,r|y) (KL_theta + KL_z [+ KL_dt]), in closed form."""
    q = log_q.exp()
    kl_tr = (q * (log_q - log_p)).flatten(1).sum(1)
    offsets = rotation_offsets(priors.rotations, q.device)[None, :, None, None]
    # q(theta|t,r) = N(mu + offset, s^2), p(theta|r) = N(offset, s_p^2): the offsets cancel in the mean term.
    kl_theta_cell = kl_normal(enc.theta_mu.float() + offsets, enc.theta_logstd.float(), offsets,
                              priors.theta_std())
    kl_z_cell = StandardNormalKL.apply(enc.z_mu.float(), enc.z_logstd.float())
    kl_shift = torch.zeros_like(kl_tr)
    if enc.shift_mu is not None:
        std = priors.shift_std_px / (image_size / 2)
        # the offset's rotation by -2 pi r'/R preserves its norm, so the KL needs no rotation
        kl_shift_cell = kl_normal(enc.shift_mu.float(), enc.shift_logstd.float()[:, None], 0.0, std).sum(1)
        kl_shift = weighted_sum(q, kl_shift_cell)
    return KLTerms(tr=kl_tr, theta=weighted_sum(q, kl_theta_cell), z=weighted_sum(q, kl_z_cell), shift=kl_shift)


@dataclass
class PosteriorSample:
    """One reparameterised draw (z, theta, t) per image for the reconstruction term of eq. 6."""

    z: torch.Tensor  # (B, Z)
    theta: torch.Tensor  # (B,)
    t: torch.Tensor  # (B, 2) generator frame


def sample(enc: EncoderOutput, log_q: torch.Tensor, grid: torch.Tensor, temperature: float,
           generator: torch.Generator | None = None) -> PosteriorSample:
    """Gumbel-softmax over (t, r), soft one-hot weighting of the cell parameters, then reparameterised draws.

    The relaxed one-hot w (B, R, M, M) averages mu and sigma of q(theta|t,r) and q(z|t,r); theta and z are drawn
    from the averaged Gaussians; t is the w-weighted sum of the grid coordinates (section 3.3.1).
    """
    b = log_q.shape[0]
    uniform = torch.rand(log_q.shape, device=log_q.device, generator=generator).clamp_(1e-10, 1.0)
    gumbel = -torch.log(-torch.log(uniform))
    w = F.softmax(((log_q + gumbel) / temperature).reshape(b, -1), dim=1).view_as(log_q)
    offsets = rotation_offsets(log_q.shape[1], log_q.device)[None, :, None, None]
    theta = _draw(weighted_sum(w, enc.theta_mu.float() + offsets), weighted_sum(w, std(enc.theta_logstd)),
                  generator)
    z = _draw(weighted_sum(w, enc.z_mu.float()), weighted_sum(w, std(enc.z_logstd)), generator)
    t = (w.sum(1).unsqueeze(-1) * grid).flatten(1, 2).sum(1)
    if enc.shift_mu is not None:
        shift_std = weighted_sum(w, std(enc.shift_logstd))[:, None]
        t = t + _draw(weighted_sum(w, rotate_shift(enc.shift_mu.float())), shift_std, generator)
    return PosteriorSample(z=z, theta=theta, t=t)


class StandardNormalKL(torch.autograd.Function):
    """KL(N(mu, exp(logstd)^2) || N(0, I)) of every cell, summed over the channel axis: (B, C, ...) -> (B, ...).

    The same closed form as ``kl_normal(mu, logstd, 0, 1).sum(1)``, 0.5 sum (sigma^2 + mu^2 - 1 - 2 logstd), in
    a few passes over the per-cell z parameters instead of one (forward and backward) per elementwise operation:
    with z_dim 32 they are the largest tensors of the whole model, 32 x R x M x M values per image and parameter.
    """

    @staticmethod
    def forward(ctx, mu, logstd):
        var = torch.exp(2 * logstd)
        ctx.save_for_backward(mu, var)
        return 0.5 * (torch.addcmul(var, mu, mu).sub_(logstd, alpha=2).sum(1) - mu.shape[1])

    @staticmethod
    def backward(ctx, grad):
        mu, var = ctx.saved_tensors
        grad = grad.unsqueeze(1)
        return grad * mu, (var - 1).mul_(grad)


def weighted_sum(w: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Sum over cells of w (B, R, M, M) times a cell parameter (B, R, M, M) or (B, C, R, M, M), in float32.

    A batched matrix-vector product, so that neither pass builds the (B, C, R, M, M) products.
    """
    b, per_channel = w.shape[0], cell.dim() == w.dim() + 1
    with torch.autocast(w.device.type, enabled=False):
        summed = torch.bmm(cell.float().reshape(b, -1 if per_channel else 1, w[0].numel()),
                           w.float().reshape(b, -1, 1)).squeeze(-1)
    return summed if per_channel else summed.view(b)


def rotate_shift(shift_mu: torch.Tensor) -> torch.Tensor:
    """Express per-cell offsets (B, 2, R, M, M), given in the frame of rotation r', in the image frame.

    dt = R(-2 pi r'/R) (a, b): when the input rotates so that the attention moves one bin up, the object's centre
    moves by R(-2 pi/R), and so does the offset, without the encoder's outputs (a, b) changing.
    """
    angle = -rotation_offsets(shift_mu.shape[2], shift_mu.device)[:, None, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    a, b = shift_mu[:, 0], shift_mu[:, 1]
    return torch.stack([cos * a - sin * b, sin * a + cos * b], dim=1)


def std(logstd: torch.Tensor) -> torch.Tensor:
    return torch.exp(logstd.float())


def _draw(mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Reparameterised sample mu + sigma * eps."""
    return mu + sigma * torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
