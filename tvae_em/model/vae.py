"""TARGET-VAE: encoder + approximate posterior + spatial generator, and the ELBO of equation 6.

    ELBO(y) = E_{(z, theta, t) ~ q}[ log p(y | z, theta, t) ] - KL(q(z, theta, t, r | y) || p(z, theta, t, r))

with the reconstruction term estimated from one Gumbel-softmax / reparameterised sample (section 3.3.1) and
the KL in closed form (eq. 5, ``posterior.kl_divergence``).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tvae_em.config import LIKELIHOODS, ModelConfig
from tvae_em.errors import UsageError
from tvae_em.model import posterior
from tvae_em.model.generator import SpatialGenerator, pixel_coordinates, transform_coordinates
from tvae_em.model.plain_encoder import CellEncoder, PlainEncoder

COARSEST_CYCLES = 1.25  # cycles across the box where the coarse-to-fine band starts (``open_band``)
BAND_EDGE = 0.02  # cycles per pixel over which frequencies fade in at the band's edge


@dataclass
class ElboTerms:
    """Batch means of eq. 6 and its parts (per image); ``loss`` is -elbo."""

    elbo: torch.Tensor
    reconstruction: torch.Tensor  # E_q log p(y | z, theta, t)
    kl: posterior.KLTerms = field(repr=False)

    @property
    def loss(self) -> torch.Tensor:
        return -self.elbo

    def scalars(self) -> dict:
        """Per-image means as floats, for logs."""
        return {"elbo": self.elbo.item(), "reconstruction": self.reconstruction.item(),
                "kl_tr": self.kl.tr.mean().item(), "kl_theta": self.kl.theta.mean().item(),
                "kl_z": self.kl.z.mean().item(), "kl_shift": self.kl.shift.mean().item()}


@dataclass
class PoseEstimate:
    """The most probable cell of q(t, r | y) and what it implies (inference, no sampling)."""

    z_mu: torch.Tensor  # (B, Z)
    z_std: torch.Tensor  # (B, Z)
    theta: torch.Tensor  # (B,) radians in [0, 2 pi): mu_theta + 2 pi r'/R at the cell
    t: torch.Tensor  # (B, 2) generator frame: sub-pixel position of the peak of q(t | y) around the MAP cell
    t_cell: torch.Tensor  # (B, 2) the MAP cell's grid position (the paper's whole-pixel read-out)
    entropy: torch.Tensor  # (B,) entropy of q(t, r | y), nats
    rotation_mass: torch.Tensor  # (B, R) sum over t of q(t, r | y): exposes rotational symmetry
    max_prob: torch.Tensor  # (B,) q of the chosen cell
    local_mass: torch.Tensor  # (B,) q within one pixel and one rotation bin of the chosen cell
    translation_mass: torch.Tensor  # (B,) q(t | y) within one pixel of the chosen position


class EscnnMissing(UsageError):
    """escnn, which the trainable encoder is built from, cannot be imported (``reason``: the ImportError)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the trainable encoder needs escnn, which cannot be imported here ({reason}); install it "
                         "(bin/install)")


class TargetVAE(nn.Module):
    """``plain_encoder``: an inference-only encoder for exported filters (``PlainEncoder``, zero until a checkpoint's
    export is loaded into it), built without escnn; otherwise escnn's trainable ``GroupConvEncoder``."""

    def __init__(self, config: ModelConfig, plain_encoder: bool = False):
        super().__init__()
        if config.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}")
        self.config = config
        self.encoder = _plain_encoder(config) if plain_encoder else _group_conv_encoder(config)
        # the generator's frame spans image_size / 2 pixels per unit: per-pixel frequencies -> per-unit ones
        self.generator = SpatialGenerator(config.z_dim, config.generator_width, config.generator_depth,
                                          config.fourier_features, config.fourier_scale * config.image_size / 2,
                                          out_channels=1, random_phase=config.fourier_random_phase,
                                          fast=config.kernels == "fast")
        if config.likelihood == "gaussian" and config.gaussian_std is None:
            self.log_sigma = nn.Parameter(torch.zeros(()))
        n = config.image_size
        self.register_buffer("coords", pixel_coordinates(n), persistent=False)
        self.register_buffer("grid", self.encoder.grid(n), persistent=False)
        self.register_buffer("log_p_tr", posterior.log_prior_tr(config.priors(), self.grid, n),
                             persistent=False)
        self.register_buffer("log_p_r", posterior.log_prior_r(config.priors()), persistent=False)
        self.register_buffer("band_fraction", torch.tensor(1.0))  # how far the band is open (``open_band``)

    # --- equation 6 -------------------------------------------------------------------------------------
    def elbo(self, images: torch.Tensor, generator: torch.Generator | None = None,
             transfer: torch.Tensor | None = None) -> ElboTerms:
        """Equation 6 averaged over the batch. images: (B, N, N) or (B, 1, N, N).

        ``transfer`` (B, N, N // 2 + 1), required when ``config.ctf`` is not 'none': what multiplies the
        spectrum of each posed generator image before the likelihood (``tvae_em.ctf.transfer``: the particle's
        CTF, which belongs to the micrograph and so does not turn with the pose). The encoder sees the image as it
        is (low-passed while the band opens, ``open_band``).
        """
        images = images.reshape(images.shape[0], 1, *images.shape[-2:])
        enc = self.encoder(self._encoder_input(images))
        log_q = posterior.log_q_tr(enc, self.log_p_r)
        kl = posterior.kl_divergence(enc, log_q, self.log_p_tr, self.config.priors(), self.config.image_size,
                                     fast=self.config.kernels == "fast")
        draw = posterior.sample(enc, log_q, self.grid, self.config.temperature, generator)
        out = self._generate(transform_coordinates(self.coords, draw.theta, draw.t), draw.z)
        if self.config.ctf != "none":
            if transfer is None:
                raise ValueError("this model applies a CTF: the ELBO needs each particle's transfer function")
            out = _spectrum_times(out.view(images.shape[0], *images.shape[-2:]), transfer).flatten(1)
        recon = self.log_likelihood(images.flatten(1), out)
        return ElboTerms(elbo=(recon - kl.total).mean(), reconstruction=recon.mean(), kl=kl)

    def log_likelihood(self, pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Equation 1: sum over pixels of log p(y_i | ...), per image. params are logits or means."""
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, pixels, reduction="none").sum(1)
        log_sigma = self.log_sigma if hasattr(self, "log_sigma") else math.log(self.config.gaussian_std)
        log_sigma = torch.as_tensor(log_sigma, device=pixels.device)
        resid = (pixels - params) / log_sigma.exp()
        return (-0.5 * resid ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)).sum(1)

    # --- coarse to fine ----------------------------------------------------------------------------------
    @torch.no_grad()
    def open_band(self, fraction: float) -> None:
        """Let through only frequencies below a cutoff ``fraction`` of the way from ``COARSEST_CYCLES`` across the
        box to the generator's highest Fourier feature; everything from ``fraction`` 1 on.

        Beyond the paper: training opens the band from coarse to fine (``TrainConfig.coarse_to_fine``), as
        refinement programs align low-passed images before fine ones and as BARF does for the poses of neural
        fields. Both sides see the band: the generator's Fourier features and the encoder's input images. So the
        poses first settle on each object's overall shape, before the details of a pseudo-symmetric object can
        lock some of its particles into a wrong orientation (and z into one template per orientation).
        """
        self.band_fraction.fill_(min(fraction, 1.0))

    def _band_gain(self, cycles_per_px: torch.Tensor) -> torch.Tensor | None:
        """Weights in [0, 1] of components at ``cycles_per_px`` under the band (a raised-cosine edge of
        ``BAND_EDGE``); None when the band is open."""
        if self.band_fraction >= 1:
            return None
        start, end = COARSEST_CYCLES / self.config.image_size, self._highest_frequency() + BAND_EDGE
        ramp = ((start + (end - start) * self.band_fraction - cycles_per_px) / BAND_EDGE).clamp(0.0, 1.0)
        return 0.5 - 0.5 * torch.cos(math.pi * ramp)

    def _highest_frequency(self) -> float:
        """The generator's highest Fourier feature frequency in cycles per pixel (Nyquist without features)."""
        if self.generator.fourier_b is None:
            return 0.5
        return (self.generator.fourier_b.norm(dim=0).max() / (self.config.image_size / 2)).item()

    def _generate(self, coords: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gain = None
        if self.generator.fourier_b is not None:
            gain = self._band_gain(self.generator.fourier_b.norm(dim=0) / (self.config.image_size / 2))
        return self.generator(coords, z, gain)[..., 0].float()

    def _encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, N, N) images as the encoder sees them: low-passed while the band is not open."""
        if self.band_fraction >= 1:
            return images
        n = images.shape[-1]
        frequency = torch.hypot(torch.fft.fftfreq(n, device=images.device)[:, None],
                                torch.fft.rfftfreq(n, device=images.device)[None, :])
        return _spectrum_times(images, self._band_gain(frequency))

    # --- inference ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> PoseEstimate:
        """Most probable (t, r) cell: its mu_z and mu_theta + offset, its position refined below a pixel
        (``posterior.peak_offset``), and how much of q(t, r | y) lies at and around it."""
        images = images.reshape(images.shape[0], 1, *images.shape[-2:])
        enc = self.encoder(self._encoder_input(images))
        log_q = posterior.log_q_tr(enc, self.log_p_r)
        b, r, m, _ = log_q.shape
        flat = log_q.reshape(b, -1)
        best = flat.argmax(1)
        rot, row, col = best // (m * m), (best // m) % m, best % m
        batch = torch.arange(b, device=images.device)
        pick = lambda cell: cell[batch, ..., rot, row, col]  # noqa: E731  (B, [C,] R, M, M) -> (B, [C])
        theta = pick(enc.theta_mu.float()) + rot.float() * (2 * math.pi / r)
        q = flat.exp()
        t_cell = self.grid[row, col]
        if enc.shift_mu is not None:
            t = t_cell + pick(posterior.rotate_shift(enc.shift_mu.float()))
        else:
            pixel = 2 / self.config.image_size  # grid spacing in the generator frame
            t = t_cell + pixel * posterior.peak_offset(torch.logsumexp(log_q, 1), row, col)
        return PoseEstimate(
            z_mu=pick(enc.z_mu.float()), z_std=pick(posterior.std(enc.z_logstd)),
            theta=torch.remainder(theta, 2 * math.pi), t=t, t_cell=t_cell,
            entropy=-(q * flat).sum(1), rotation_mass=q.view(b, r, -1).sum(-1), max_prob=q.max(1).values,
            **posterior.neighbourhood_mass(q.view(b, r, m, m), rot, row, col))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, theta: torch.Tensor | None = None, t: torch.Tensor | None = None,
               image_size: int | None = None) -> torch.Tensor:
        """Images (B, N, N) for content z with pose (theta, t): Bernoulli means or Gaussian means."""
        n = image_size or self.config.image_size
        b = z.shape[0]
        theta = torch.zeros(b, device=z.device) if theta is None else theta
        t = torch.zeros(b, 2, device=z.device) if t is None else t
        coords = self.coords if n == self.config.image_size else pixel_coordinates(n, z.device)
        out = self._generate(transform_coordinates(coords, theta, t), z)
        if self.config.likelihood == "bernoulli":
            out = torch.sigmoid(out)
        return out.view(b, n, n)


def _plain_encoder(config: ModelConfig) -> CellEncoder:
    return PlainEncoder(config.rotations, config.z_dim, config.encoder_fields, config.encoder_kernel,
                        config.encoder_padding, config.subpixel, config.encoder_pointwise)


def _group_conv_encoder(config: ModelConfig) -> CellEncoder:
    try:  # imported here, so that a model with a plain encoder never imports escnn
        from tvae_em.model.encoder import GroupConvEncoder
    except ImportError as exc:
        raise EscnnMissing(str(exc)) from None
    return GroupConvEncoder(config.rotations, config.z_dim, config.encoder_fields, config.encoder_kernel,
                            config.encoder_padding, config.subpixel,
                            theta_logstd_init=math.log(config.priors().theta_std()),
                            pointwise=config.encoder_pointwise, fast=config.kernels == "fast")


def _spectrum_times(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Images (..., N, N) with their spectra multiplied by ``factors`` (broadcasting to (..., N, N // 2 + 1)),
    in float32 whatever the autocast."""
    with torch.autocast(images.device.type, enabled=False):
        return torch.fft.irfft2(torch.fft.rfft2(images.float()) * factors.float(), s=images.shape[-2:])
