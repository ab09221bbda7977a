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

Memory and speed. The features of a batch are large (100 images x 2500 pixels x 2048 features is 2 GB in
float32) and are only needed to feed the coordinate layer, so by default (``fused = True``) the features and that
layer are computed together a few thousand pixels at a time (``FourierLinear``), in the autocast precision for
the matrix product but always float32 for the phases (bfloat16 phases of up to ~100 rad would be off by ~0.3
rad), and recomputed in the backward pass instead of being stored. ``fused = False`` is the plain reference.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_VALUES = 1 << 21  # Fourier feature values (pixels x features) per chunk of FourierLinear on CPU


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
                 fourier_scale: float = 3.0, out_channels: int = 1, random_phase: bool = False):
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
        self.fused = True  # False: materialise the Fourier features (the reference for FourierLinear)

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
        if self.fused and self.fourier_b is not None:
            h = FourierLinear.apply(coords, self.fourier_b, weight, bias, self.fourier_phase)
        else:
            h = F.linear(self.features(coords), weight, bias)
        if self.z_layer is not None:
            h = h + self.z_layer(z).unsqueeze(1)
        # The activations work in place; a 2-D input makes every Linear output a whole tensor rather than a view
        # (in-place ops on views make autograd copy gradients back into the base).
        h = self.shared[0](h)
        return self.shared[1:](h.view(-1, h.shape[-1])).view(*h.shape[:-1], -1)


class FourierLinear(torch.autograd.Function):
    """``coord_layer(features(coords))`` in chunks of pixels, features recomputed in the backward pass.

    coords (..., 2), fourier_b (2, F), weight (W, 2F), bias (W,) -> (..., W); with phases (F,), the features are
    cos(phase + phases) and weight is (W, F). Gradients flow to the coordinates (hence to the pose), the weight
    and the bias; ``fourier_b`` and ``phases`` are fixed buffers. Under autocast the matrix
    products run in the autocast dtype (the result has that dtype, as ``nn.Linear``'s would) while phases, sines
    and cosines stay float32. Memory beyond the output: one chunk of features.
    """

    @staticmethod
    def forward(ctx, coords, fourier_b, weight, bias, phases=None):
        device = coords.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            flat, scaled_b = _phase_inputs(coords, fourier_b)
            weight_c, bias_c = weight.to(dtype), bias.to(dtype)  # bias required (nn.Linear's)
            out = torch.empty(*coords.shape[:-1], len(weight), dtype=dtype, device=coords.device)
            for rows, cos, sin in _chunked_trig(flat, scaled_b, phases, sines=phases is None):
                torch.addmm(bias_c, _features(cos, sin, dtype, phases), weight_c.t(),
                            out=out.view(len(flat), -1)[rows])
        ctx.save_for_backward(coords, fourier_b, weight, phases)
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        coords, fourier_b, weight, phases = ctx.saved_tensors
        dtype, n_features = ctx.dtype, fourier_b.shape[1]
        device = coords.device.type
        with torch.autocast(device, enabled=False):
            flat, scaled_b = _phase_inputs(coords, fourier_b)
            grad = grad.reshape(len(flat), -1).to(dtype)
            weight_c = weight.to(dtype)
            weight_grad = torch.zeros(weight.shape, dtype=flat.dtype, device=weight.device)
            coords_grad = torch.empty_like(flat)
            for rows, cos, sin in _chunked_trig(flat, scaled_b, phases):
                weight_grad += (grad[rows].t() @ _features(cos, sin, dtype, phases)).to(flat.dtype)
                feature_grad = (grad[rows] @ weight_c).to(flat.dtype)  # d loss / d features
                if phases is not None:  # d/dphase of cos: -sin
                    phase_grad = feature_grad.mul_(sin).neg_()
                else:  # d/dphase: g_sin cos - g_cos sin, in one dtype (mixed-dtype products are ~3x slower)
                    phase_grad = feature_grad[:, n_features:] * cos
                    phase_grad.addcmul_(feature_grad[:, :n_features], sin, value=-1)
                torch.mm(phase_grad, scaled_b.t(), out=coords_grad[rows])
            bias_grad = grad.to(flat.dtype).sum(0)
        return (coords_grad.view(coords.shape).to(coords.dtype), None, weight_grad.to(weight.dtype),
                bias_grad.to(weight.dtype), None)


def _phase_inputs(coords: torch.Tensor, fourier_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 2) coordinates and 2 pi B, in float32 at least whatever the autocast or parameter dtype."""
    dtype = torch.promote_types(coords.dtype, torch.float32)
    return coords.reshape(-1, 2).to(dtype), (2 * math.pi) * fourier_b.to(dtype)


def _chunk_rows(device_type: str, n_features: int) -> int:
    """Pixels per chunk: on CPU ~2M feature values (2048 pixels of 1024 features), small enough to stay in cache
    (measured: 2.3x faster than one batch-sized block at the paper's size); on GPUs 64x more, so that every
    kernel launch is large."""
    values = CHUNK_VALUES if device_type == "cpu" else 64 * CHUNK_VALUES
    return max(1, values // n_features)


def _chunked_trig(flat: torch.Tensor, scaled_b: torch.Tensor, phases: torch.Tensor | None = None,
                  sines: bool = True):
    """(row slice, cos, sin) of the phases 2 pi B x (+ ``phases``) for consecutive chunks of the (P, 2)
    coordinates; sin is None unless ``sines``."""
    step = _chunk_rows(flat.device.type, scaled_b.shape[1])
    for start in range(0, len(flat), step):
        rows = slice(start, start + step)
        phase = flat[rows] @ scaled_b
        if phases is not None:
            phase += phases.to(phase.dtype)
        yield rows, torch.cos(phase), torch.sin(phase) if sines else None


def _features(cos: torch.Tensor, sin: torch.Tensor | None, dtype: torch.dtype, phases: torch.Tensor | None
              ) -> torch.Tensor:
    """A chunk's inputs of the coordinate layer in ``dtype``: the phase-shifted cosines alone when there are
    ``phases``, else [cos, sin], written once (no float32 concatenation before the cast)."""
    if phases is not None:
        return cos.to(dtype)
    out = torch.empty(len(cos), 2 * cos.shape[1], dtype=dtype, device=cos.device)
    out[:, :cos.shape[1]] = cos
    out[:, cos.shape[1]:] = sin
    return out
