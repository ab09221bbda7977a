"""Spatial generator (paper sections 3.1 and 3.3.2, equations 1-2).

The generator maps a pixel coordinate and the content vector z to that pixel's value, so that an image is a
function over coordinates and rotating or translating it is a transformation of the coordinates:

    log p(y | z, theta, t) = sum_i log p(y_i | z, x_i')   with   x_i' = R(theta) (x_i - t)            (eq. 2)

This is eq. 2's ``R(theta) x + t'`` with ``t' = -R(theta) t``: written this way t is where the object's centre
lies in the image, the same quantity the encoder's attention grid locates (as in the authors' code, which shifts
the coordinates before rotating them). Coordinates use the project frame: pixel (row, col) of an N x N image is
x = ((col - N//2) / (N/2), (row - N//2) / (N/2)), origin at RELION's box centre.

x' is expanded with random Fourier features [cos 2 pi B x', sin 2 pi B x'] (B ~ N(0, scale^2) cycles per unit of
the frame, fixed; ``ModelConfig.fourier_scale`` states it per pixel, so that one value fits every box), or, with
``random_phase``, cos(2 pi B x' + phi) with fixed phases phi ~ U[0, 2 pi) (the authors' code, and Rahimi and
Recht's original random features: half the inputs to the coordinate layer for as many frequencies). The
coordinate path and the z path go through separate linear layers, are summed, and pass through shared
fully-connected layers with LeakyReLU.

Speed. With ``fast`` (``ModelConfig.kernels``), the features and the coordinate layer run as one kernel,
``kernels.FourierLinear``, which never holds the features of a whole batch; otherwise as written here.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from tvae_em.model.kernels import FourierLinear


def pixel_coordinates(image_size: int, device=None) -> torch.Tensor:
    """(N*N, 2) coordinates (x, y) of the pixels in row-major order, in the project frame."""
    px = (torch.arange(image_size, device=device, dtype=torch.float32) - image_size // 2) / (image_size / 2)
    rows, cols = torch.meshgrid(px, px, indexing="ij")
    return torch.stack([cols.flatten(), rows.flatten()], dim=-1)


def rotation_matrix(theta: torch.Tensor) -> torch.Tensor:
    """R(theta) = [[cos, -sin], [sin, cos]] for a batch of angles, (B, 2, 2)."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def transform_coordinates(coords: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x' = R(theta) (x - t) for every pixel and image: coords (P, 2), theta (B,), t (B, 2) -> (B, P, 2).

    Always float32, also under autocast: a bfloat16 product would round x' by up to ~0.2 px at 50 px and
    ~0.5 px at 128 px, and bend the gradients that teach the encoder its poses."""
    with torch.autocast(coords.device.type, enabled=False):
        shifted = coords.float().unsqueeze(0) - t.float().unsqueeze(1)
        return shifted @ rotation_matrix(theta.float()).transpose(1, 2)


class SpatialGenerator(nn.Module):
    """p(y_i | z, x_i'): (B, P, 2) coordinates and (B, Z) content -> (B, P, out_channels) parameters."""

    def __init__(self, z_dim: int, width: int = 512, depth: int = 2, fourier_features: int = 1024,
                 fourier_scale: float = 3.0, out_channels: int = 1, random_phase: bool = False, fast: bool = True):
        super().__init__()
        # None when not used: not in the state then, so that checkpoints of [cos, sin] generators load as before
        self.register_buffer("fourier_phase", None)
        if fourier_features > 0:
            self.register_buffer("fourier_b", torch.randn(2, fourier_features) * fourier_scale)
            coord_dim = 2 * fourier_features
            if random_phase:
                self.fourier_phase = torch.rand(fourier_features) * (2 * math.pi)
                coord_dim = fourier_features
        else:  # plain coordinates, as in spatial-VAE
            self.fourier_b = None
            coord_dim = 2
        self.coord_layer = nn.Linear(coord_dim, width)
        self.z_layer = nn.Linear(z_dim, width, bias=False) if z_dim > 0 else None
        shared = []
        for _ in range(depth - 1):  # in-place activations: autograd keeps one (B, P, width) tensor per layer
            shared += [nn.Linear(width, width), nn.LeakyReLU(inplace=True)]
        self.shared = nn.Sequential(nn.LeakyReLU(inplace=True), *shared, nn.Linear(width, out_channels))
        self.fast = fast  # the features and the coordinate layer as one kernel (module docstring)

    def features(self, coords: torch.Tensor) -> torch.Tensor:
        if self.fourier_b is None:
            return coords
        phase = (2 * math.pi) * (coords @ self.fourier_b)
        if self.fourier_phase is not None:
            return torch.cos(phase + self.fourier_phase)
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)

    def forward(self, coords: torch.Tensor, z: torch.Tensor, feature_gain: torch.Tensor | None = None) -> torch.Tensor:
        """``feature_gain`` (F,): a weight per Fourier feature (coarse-to-fine training lets the low frequencies
        through first); it folds into the columns of the coordinate layer."""
        weight, bias = self.coord_layer.weight, self.coord_layer.bias
        if feature_gain is not None:  # one column per feature, or two: [cos, sin]
            weight = weight * feature_gain.repeat(weight.shape[1] // len(feature_gain))
        if self.fast and self.fourier_b is not None:
            h = FourierLinear.apply(coords, self.fourier_b, weight, bias, self.fourier_phase)
        else:
            h = F.linear(self.features(coords), weight, bias)
        if self.z_layer is not None:
            h = h + self.z_layer(z).unsqueeze(1)
        # The activations work in place; a 2-D input makes every Linear output a whole tensor rather than a view
        # (in-place ops on views make autograd copy gradients back into the base).
        h = self.shared[0](h)
        return self.shared[1:](h.view(-1, h.shape[-1])).view(*h.shape[:-1], -1)
