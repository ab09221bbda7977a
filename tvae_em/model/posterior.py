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

from tvae_em.config import Priors
from tvae_em.model.generator import rotation_matrix
from tvae_em.model.kernels import StandardNormalKL
from tvae_em.model.plain_encoder import EncoderOutput


def rotation_offsets(rotations: int, device=None) -> torch.Tensor:
    """theta_offset = 2 pi r' / R for r' = 0..R-1, the rotation of each discrete group element."""
    return torch.arange(rotations, device=device, dtype=torch.float32) * (2 * math.pi / rotations)


def log_prior_r(priors: Priors, device=None) -> torch.Tensor:
    """log p(r) up to a constant, (R,): zero (uniform) or the discretised N(0, std^2) at the offsets."""
    offsets = rotation_offsets(priors.rotations, device)
    if priors.rotation_prior == "uniform":
        return torch.zeros_like(offsets)
    if priors.rotation_prior == "normal":
        wrapped = torch.remainder(offsets + math.pi, 2 * math.pi) - math.pi
        return -wrapped ** 2 / (2 * priors.rotation_prior_std_rad ** 2)
    raise ValueError(f"unknown rotation prior {priors.rotation_prior!r}")


def log_prior_tr(priors: Priors, grid: torch.Tensor, image_size: int) -> torch.Tensor:
    """log p(t, r) = log p(t) + log p(r), normalised over all cells: (R, M, M)."""
    std_model = priors.translation_std_px / (image_size / 2)
    log_pt = -(grid ** 2).sum(-1) / (2 * std_model ** 2)
    joint = log_prior_r(priors, grid.device)[:, None, None] + log_pt[None]
    return joint - torch.logsumexp(joint.flatten(), 0)


def log_q_tr(enc: EncoderOutput, log_p_r: torch.Tensor) -> torch.Tensor:
    """log q(t, r | y) = log_softmax over all cells (r', i, j) of a(y) + log p(r'), (B, R, M, M).

    log p(r) joins the attention logits as in the authors' code: the encoder's output biases are shared by the
    rotations of a field (a regular field's bias is rotation-invariant), so q could not learn the prior's tilt
    towards some rotations by itself. A uniform p(r) adds a constant and changes nothing.
    """
    b = enc.logits.shape[0]
    logits = enc.logits.float() + log_p_r[:, None, None]
    return F.log_softmax(logits.reshape(b, -1), dim=1).view_as(enc.logits)


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
                  image_size: int, fast: bool = True) -> KLTerms:
    """Equation 5: KL_{t,r} + sum_{t,r} q(t,r|y) (KL_theta + KL_z [+ KL_dt]), in closed form; KL_z by
    ``kernels.StandardNormalKL`` when ``fast``."""
    q = log_q.exp()
    kl_tr = (q * (log_q - log_p)).flatten(1).sum(1)
    offsets = rotation_offsets(priors.rotations, q.device)[None, :, None, None]
    # q(theta|t,r) = N(mu + offset, s^2), p(theta|r) = N(offset, s_p^2): the offsets cancel in the mean term.
    kl_theta_cell = kl_normal(enc.theta_mu.float() + offsets, enc.theta_logstd.float(), offsets,
                              priors.theta_std())
    z_mu, z_logstd = enc.z_mu.float(), enc.z_logstd.float()
    kl_z_cell = StandardNormalKL.apply(z_mu, z_logstd) if fast else kl_normal(z_mu, z_logstd, 0.0, 1.0).sum(1)
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

    The rotation offsets 2 pi r'/R are averaged as angles relative to the bin that holds most of w, each taken
    in (-pi, pi] from it: a sample split between the last and the first bin lands between them, not half a
    turn away as the average of the raw offsets in [0, 2 pi) would.
    """
    b = log_q.shape[0]
    uniform = torch.rand(log_q.shape, device=log_q.device, generator=generator).clamp_(1e-10, 1.0)
    gumbel = -torch.log(-torch.log(uniform))
    w = F.softmax(((log_q + gumbel) / temperature).reshape(b, -1), dim=1).view_as(log_q)
    theta_mu = weighted_sum(w, enc.theta_mu.float()) + _mean_offset(w)
    theta = _draw(theta_mu, weighted_sum(w, std(enc.theta_logstd)), generator)
    z = _draw(weighted_sum(w, enc.z_mu.float()), weighted_sum(w, std(enc.z_logstd)), generator)
    t = (w.sum(1).unsqueeze(-1) * grid).flatten(1, 2).sum(1)
    if enc.shift_mu is not None:
        shift_std = weighted_sum(w, std(enc.shift_logstd))[:, None]
        t = t + _draw(weighted_sum(w, rotate_shift(enc.shift_mu.float())), shift_std, generator)
    return PosteriorSample(z=z, theta=theta, t=t)


def _mean_offset(w: torch.Tensor) -> torch.Tensor:
    """sum over cells of w times the cell's rotation offset, unwrapped around the bin of largest mass: (B,)."""
    bins = w.shape[1]
    offsets = rotation_offsets(bins, w.device)
    mass = w.float().sum((2, 3))  # (B, R)
    reference = offsets[mass.argmax(1)]  # (B,)
    relative = torch.remainder(offsets[None] - reference[:, None] + math.pi, 2 * math.pi) - math.pi
    return reference + (mass * relative).sum(1)


def weighted_sum(w: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Sum over cells of w (B, R, M, M) times a cell parameter (B, R, M, M) or (B, C, R, M, M), in float32.

    A batched matrix-vector product, so that neither pass builds the (B, C, R, M, M) products.
    """
    b, per_channel = w.shape[0], cell.dim() == w.dim() + 1
    with torch.autocast(w.device.type, enabled=False):
        summed = torch.bmm(cell.float().reshape(b, -1 if per_channel else 1, w[0].numel()),
                           w.float().reshape(b, -1, 1)).squeeze(-1)
    return summed if per_channel else summed.view(b)


def peak_offset(log_q_t: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Sub-cell position (x, y) of the peak of q(t | y) around cell (row, col), in cells: (B, 2).

    log_q_t: log q(t | y) = logsumexp over r of log q(t, r | y), (B, M, M).

    Beyond the paper, which reads out whole cells: along each axis a parabola through log q at the cell and its
    two neighbours (exact for a Gaussian-shaped peak), its vertex clipped to the cell's half-width. A peak
    shared equally by two cells lands half-way between them; a cell on the grid's edge keeps its position.
    """
    b, m = log_q_t.shape[0], log_q_t.shape[-1]
    batch = torch.arange(b, device=log_q_t.device)

    def at(d_row: int, d_col: int) -> torch.Tensor:
        return log_q_t[batch, (row + d_row).clamp(0, m - 1), (col + d_col).clamp(0, m - 1)]

    centre = at(0, 0)
    offsets = []
    for index, (d_row, d_col) in ((col, (0, 1)), (row, (1, 0))):  # x along the columns, y along the rows
        low, high = at(-d_row, -d_col), at(d_row, d_col)
        curvature = low - 2 * centre + high
        vertex = (0.5 * (low - high) / curvature.clamp(max=-1e-12)).clamp(-0.5, 0.5)
        peak_inside = (index > 0) & (index < m - 1) & (curvature < 0)
        offsets.append(torch.where(peak_inside, vertex, torch.zeros_like(vertex)))
    return torch.stack(offsets, dim=1)


def neighbourhood_mass(q: torch.Tensor, rot: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> dict:
    """How concentrated q(t, r | y) (B, R, M, M) is around the chosen cell (rot, row, col), each (B,):

    ``local_mass``: q within one cell (one pixel) and one rotation bin (circularly) of the chosen cell;
    ``translation_mass``: q(t | y), summed over rotations, within one pixel of the chosen position.
    A flat posterior (an untrained model, a particle the model cannot place) gives a few percent at most.
    """
    b, r, m, _ = q.shape
    padded = F.pad(q, (1, 1, 1, 1))  # zeros beyond the grid
    steps = torch.arange(3, device=q.device)
    rows = (row[:, None] + steps)[:, :, None]  # (B, 3, 1) in padded coordinates
    cols = (col[:, None] + steps)[:, None, :]  # (B, 1, 3)
    batch = torch.arange(b, device=q.device)[:, None, None]
    window = torch.stack([padded[batch, (rot[:, None, None] + d) % r, rows, cols] for d in (-1, 0, 1)], 1)
    translation = padded.sum(1)[batch, rows, cols]
    return {"local_mass": window.flatten(1).sum(1), "translation_mass": translation.flatten(1).sum(1)}


def rotate_shift(shift_mu: torch.Tensor) -> torch.Tensor:
    """Express per-cell offsets (B, 2, R, M, M), given in the frame of rotation r', in the image frame.

    dt = R(-2 pi r'/R) (a, b): when the input rotates so that the attention moves one bin up, the object's centre
    moves by R(-2 pi/R), and so does the offset, without the encoder's outputs (a, b) changing.
    """
    rotations = rotation_matrix(-rotation_offsets(shift_mu.shape[2], shift_mu.device))  # (R, 2, 2)
    return torch.einsum("rij,bjrmn->birmn", rotations.to(shift_mu.dtype), shift_mu)


def std(logstd: torch.Tensor) -> torch.Tensor:
    return torch.exp(logstd.float())


def _draw(mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Reparameterised sample mu + sigma * eps."""
    return mu + sigma * torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
