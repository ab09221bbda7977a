"""The model's hand-written fast kernels, each the same function as the plain code it replaces (its reference).

``ModelConfig.kernels`` chooses once for a model: 'fast' (the default) runs these, 'reference' runs the plain code
that states the paper's equations; tests/test_speed_paths.py and tests/test_model.py check every pair (values and
gradients, in float64 and under bfloat16 autocast). The references:

- ``FourierLinear``: ``SpatialGenerator``'s coordinate layer on materialised Fourier features
  (``SpatialGenerator.features``, then ``F.linear``). The features of a batch are large (100 images x 2500 pixels
  x 2048 features is 2 GB in float32) and only feed that layer, so the kernel computes features and layer
  together a few thousand pixels at a time, in the autocast precision for the matrix product but always float32
  for the phases (bfloat16 phases of up to ~100 rad would be off by ~0.3 rad), and recomputes them in the
  backward pass instead of storing them.
- ``StandardNormalKL``: KL_z of every cell, ``posterior.kl_normal(mu, logstd, 0, 1).sum(1)``.
- ``BigKernelConv``: the encoder's first convolution (``F.conv2d``) with a faster filter gradient on CPU, used by
  ``plain_encoder.plain_group_conv`` (whose own reference is escnn's modules, ``GroupConvEncoder`` with
  'reference' kernels).
"""

import math

import torch
import torch.nn.functional as F

CHUNK_VALUES = 1 << 21  # Fourier feature values (pixels x features) per chunk of FourierLinear on CPU
_UNFOLDED_VALUES = 1 << 22  # input patches unfolded at a time for the first layer's filter gradient


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


class BigKernelConv(torch.autograd.Function):
    """``F.conv2d`` whose filter gradient is a matrix product over unfolded input patches (CPU only).

    oneDNN's filter gradient for one input channel and a kernel of half the box is 2-4x slower than the
    convolution itself (bfloat16 and float32); the patches of a few images at a time turn it into one
    well-shaped matrix product. The images need no gradient (they are data); the filter and bias get exact ones.
    Under autocast the inputs are cast as ``F.conv2d`` would cast them, and the gradients are returned to them.
    """

    @staticmethod
    def forward(ctx, images, weight, bias, padding):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        with torch.autocast("cpu", enabled=False):
            images, weight = images.to(dtype), weight.to(dtype)  # strides (the layout) preserved
            bias = None if bias is None else bias.to(dtype)
            ctx.save_for_backward(images)
            ctx.padding, ctx.kernel, ctx.dtypes = padding, weight.shape[-1], (weight.dtype, bias is not None)
            return F.conv2d(images, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        (images,) = ctx.saved_tensors
        dtype, has_bias = ctx.dtypes
        grad = grad.to(dtype)
        k, channels, patch = ctx.kernel, grad.shape[1], images.shape[1] * ctx.kernel ** 2
        chunk = max(1, _UNFOLDED_VALUES // (patch * grad.shape[2] * grad.shape[3]))  # images per product
        total = torch.promote_types(dtype, torch.float32)  # accumulate in at least float32
        weight_grad = torch.zeros(channels, patch, dtype=total, device=grad.device)
        for start in range(0, len(images), chunk):
            patches = F.unfold(images[start:start + chunk], k, padding=ctx.padding)  # (c, C_in K^2, M^2)
            rows = grad[start:start + chunk].permute(0, 2, 3, 1).reshape(-1, channels)  # (c M^2, C)
            weight_grad += (rows.t() @ patches.transpose(1, 2).reshape(-1, patch)).to(total)
        bias_grad = grad.to(total).sum((0, 2, 3)).to(dtype) if has_bias else None
        return None, weight_grad.view(channels, -1, k, k).to(dtype), bias_grad, None
