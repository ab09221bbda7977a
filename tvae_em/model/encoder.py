"""Group-convolutional encoder (paper section 3.3.1).

One large-kernel group convolution over P_r = translations x r discrete rotations (escnn ``rot2dOnR2(N=r)``,
trivial input field -> ``fields`` regular fields), LeakyReLU, then three 1x1 group convolutions. The last one
outputs, for every position (i, j) and discrete rotation r', the parameters of the approximate posterior:
the attention logit a(y)_{i,j,r'}, mu_theta, log sigma_theta, mu_z, log sigma_z (and, with sub-pixel
translation, a per-cell translation offset). Those are regular fields, so rotating the input by one group
element permutes the rotation axis cyclically and rotates the map: the posterior is equivariant by
construction.

Translation grid. Output cell (i, j) is the response of the filter centred on input pixel
    row = i - padding + (kernel - 1) / 2,   col = j - padding + (kernel - 1) / 2,
and its translation in the generator frame is t = ((col - N//2) / (N/2), (row - N//2) / (N/2)), the same frame in
which the generator places pixel (row, col) (``tvae_em.model.generator.pixel_coordinates``). With an even kernel
the cells sit on half pixels; the mapping stays exact.

Speed. The layers run as plain torch ops on the filters escnn expands (``plain_group_conv``): the big-kernel
convolution in channels-last layout and the 1x1 group convolutions as matrix products over the channel axis of
that layout, and on CPU the first layer's filter gradient as a matrix product over unfolded patches. The result
is the convolution escnn's own modules compute (``escnn_forward = True``, the reference it is tested against),
several times faster to train, in bfloat16 above all (benchmarks/RESULTS.md, "Throughput").
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from escnn import gspaces
from escnn import nn as enn
from torch import nn

_DENORMAL = 1e-20  # escnn's sampled filter bases hold denormal floats that slow CPU convolutions ~1.6x
_SLOPE = 0.01  # negative slope of escnn's LeakyReLU (its default), reproduced by the plain-torch path
_UNFOLDED_VALUES = 1 << 22  # input patches unfolded at a time for the first layer's filter gradient
_ROWS = 1 << 13  # cells per float32 product of the output layer in bfloat16 inference
_OUTPUT_INIT_SCALE = 0.1  # initial weights of the posterior's location and scale fields, relative to escnn's


@dataclass
class EncoderOutput:
    """Per-cell posterior parameters, each shaped (B, [C,] R, M, M): R discrete rotations, M x M positions."""

    logits: torch.Tensor  # a(y): (B, R, M, M)
    theta_mu: torch.Tensor  # mu_theta without the 2 pi r'/r offset: (B, R, M, M)
    theta_logstd: torch.Tensor  # (B, R, M, M)
    z_mu: torch.Tensor  # (B, Z, R, M, M)
    z_logstd: torch.Tensor  # (B, Z, R, M, M)
    shift_mu: torch.Tensor | None = None  # sub-pixel offset in the frame of rotation r': (B, 2, R, M, M)
    shift_logstd: torch.Tensor | None = None  # isotropic, so rotation-invariant: (B, R, M, M)


class GroupConvEncoder(nn.Module):
    """y (B, 1, N, N) -> EncoderOutput. See the module docstring for the layers and the grid."""

    def __init__(self, rotations: int, z_dim: int, fields: int = 128, kernel: int = 28, padding: int = 8,
                 subpixel: bool = False, theta_logstd_init: float = 0.0):
        super().__init__()
        self.rotations, self.z_dim, self.kernel, self.padding = rotations, z_dim, kernel, padding
        self.subpixel = subpixel
        self.gspace = gspaces.rot2dOnR2(N=rotations)
        n_out = 3 + 2 * z_dim + (3 if subpixel else 0)
        self.in_type = enn.FieldType(self.gspace, [self.gspace.trivial_repr])
        hidden = enn.FieldType(self.gspace, fields * [self.gspace.regular_repr])
        self.out_type = enn.FieldType(self.gspace, n_out * [self.gspace.regular_repr])
        self.net = enn.SequentialModule(
            enn.R2Conv(self.in_type, hidden, kernel_size=kernel, padding=padding),
            enn.LeakyReLU(hidden, negative_slope=_SLOPE, inplace=True),
            enn.R2Conv(hidden, hidden, kernel_size=1),
            enn.LeakyReLU(hidden, negative_slope=_SLOPE, inplace=True),
            enn.R2Conv(hidden, hidden, kernel_size=1),
            enn.LeakyReLU(hidden, negative_slope=_SLOPE, inplace=True),
            enn.R2Conv(hidden, self.out_type, kernel_size=1),
        )
        _flush_denormal_bases(self.net)
        self._start_near_priors(theta_logstd_init)
        self._exported = None
        self.escnn_forward = False  # True: run escnn's modules (the reference for the plain-torch path)

    def _start_near_priors(self, theta_logstd: float) -> None:
        """Initialise the output layer so that q(theta | t, r) and q(z | t, r) start close to their priors.

        escnn's initialisation gives every output a spread of about 1-3 with extremes above 10 across the cells
        of a batch, so some cells started with sigma_z = exp(16): KL_z of 1e8 nats and samples of z that wrecked
        the first steps of training. Here every field but the attention logits gets its weights scaled by
        ``_OUTPUT_INIT_SCALE`` and its bias set to the prior's value (log sigma_theta = ``theta_logstd``, log
        sigma_z = 0, means 0); the logits keep escnn's initialisation, whose equivariant response to the image
        is what first tells the cells apart. Scaling whole fields keeps the layer exactly equivariant.
        """
        last = self.net[-1]
        fields = len(self.out_type)
        with torch.no_grad():
            weights = last.weights.view(fields, len(last.in_type), -1)  # [out field, in field, basis]
            weights[1:] *= _OUTPUT_INIT_SCALE
            last.bias.zero_()
            last.bias[2] = theta_logstd  # field order: logits, theta_mu, theta_logstd, z_mu.., z_logstd.., shift..

    def grid_size(self, image_size: int) -> int:
        return image_size + 2 * self.padding - self.kernel + 1

    def grid(self, image_size: int) -> torch.Tensor:
        """Translation of every output cell in the generator frame, (M, M, 2) as (x, y); see module docstring."""
        m = self.grid_size(image_size)
        centre_px = torch.arange(m, dtype=torch.float64) - self.padding + (self.kernel - 1) / 2
        coord = ((centre_px - image_size // 2) / (image_size / 2)).float()
        rows, cols = torch.meshgrid(coord, coord, indexing="ij")
        return torch.stack([cols, rows], dim=-1)

    def export(self) -> None:
        """Freeze the expanded filters for inference (plain torch convolutions, no filter expansion per call).

        Call after training; ``train()`` drops the exported copy so training expands the filters again.
        """
        self.net.eval()
        self._exported = self.net.export().requires_grad_(False)  # a frozen copy, not more parameters

    def train(self, mode: bool = True):
        if mode:
            self._exported = None
        return super().train(mode)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        if self.escnn_forward:
            out = self.net(enn.GeometricTensor(images, self.in_type)).tensor.float()
        else:
            out = plain_group_conv(images, self._filters(), self.padding)
        b, _, m, _ = out.shape
        # escnn lays out regular fields contiguously: channel = field * R + rotation element. One split, not
        # indexing: autograd joins split gradients in one pass, where each index would zero a full-size tensor.
        z = self.z_dim
        sizes = [1, 1, 1, z, z] + ([2, 1] if self.subpixel else [])
        logits, theta_mu, theta_logstd, z_mu, z_logstd, *shift = out.view(b, -1, self.rotations, m, m).split(
            sizes, dim=1)
        result = EncoderOutput(logits=logits.squeeze(1), theta_mu=theta_mu.squeeze(1),
                               theta_logstd=theta_logstd.squeeze(1), z_mu=z_mu, z_logstd=z_logstd)
        if self.subpixel:
            result.shift_mu, result.shift_logstd = shift[0], shift[1].squeeze(1)
        return result

    def _filters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(filter, bias) of every layer as escnn expands them: frozen after ``export``, cached by escnn in eval
        mode, expanded from the trainable weights (differentiably) in training mode."""
        if self._exported is not None:
            return [(m.weight, m.bias) for m in self._exported if isinstance(m, nn.Conv2d)]
        convs = [m for m in self.net if isinstance(m, enn.R2Conv)]
        return [conv.expand_parameters() if conv.training else (conv.filter, conv.expanded_bias) for conv in convs]


def plain_group_conv(images: torch.Tensor, filters: list, padding: int) -> torch.Tensor:
    """The encoder's layers on expanded filters: big-kernel conv, then LeakyReLU + 1x1 conv three times.

    Channels-last layout throughout: the first convolution writes (B, M, M, C) memory, on which each 1x1 group
    convolution is one matrix product (``F.linear``) over the channel axis. Activations are applied in place on
    whole tensors (never on views, which would make autograd copy their gradients back into the base), so
    autograd keeps one tensor per layer. Returns float32 (B, C_out, M, M).
    """
    (first, first_bias), *pointwise = filters
    if _first_layer_channels_last(images.device.type):
        # .to, not .contiguous: with one input channel both layouts count as contiguous, and only explicit
        # channels-last strides make the convolution write channels-last output
        images, first = images.to(memory_format=torch.channels_last), first.to(memory_format=torch.channels_last)
    if images.device.type == "cpu" and torch.is_grad_enabled() and first.requires_grad:
        h = _BigKernelConv.apply(images, first, first_bias, padding)
    else:
        h = F.conv2d(images, first, first_bias, padding=padding)
    b, _, m, _ = h.shape
    # (B M M, C): a view of channels-last output, a copy of NCHW output
    h = F.leaky_relu(h, _SLOPE, inplace=True).permute(0, 2, 3, 1).reshape(b * m * m, -1)
    *hidden, (last, last_bias) = pointwise
    for weight, bias in hidden:
        h = F.leaky_relu(F.linear(h, weight.flatten(1), bias), _SLOPE, inplace=True)
    h = _output_layer(h, last.flatten(1), last_bias)
    # one pass for both the layout and the cast: the posterior works in float32 on every cell
    return h.view(b, m, m, -1).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)


def _output_layer(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The last 1x1 layer. In inference under autocast it runs in float32 on rows of a few thousand cells at a
    time: rounding the attention logits to bfloat16 (steps of 0.25 at 50) would move the most probable cell of
    ambiguous particles; the layer has few outputs, so float32 costs little there."""
    if torch.is_grad_enabled() or not torch.is_autocast_enabled(h.device.type):
        return F.linear(h, weight, bias)
    with torch.autocast(h.device.type, enabled=False):
        bias = None if bias is None else bias.float()
        return torch.cat([F.linear(rows.float(), weight.float(), bias) for rows in h.split(_ROWS)])


def _first_layer_channels_last(device_type: str) -> bool:
    """Layout of the big-kernel convolution. On CPU, channels-last is 4x faster in bfloat16 but up to 2x slower
    in float32 (measured at 50 and 100 px boxes); GPUs' tensor cores favour channels-last (not measured here)."""
    return device_type != "cpu" or torch.is_autocast_enabled("cpu")


class _BigKernelConv(torch.autograd.Function):
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


def _flush_denormal_bases(module: nn.Module) -> None:
    """Zero the tiny entries of escnn's sampled filter bases once (keeps 90-degree equivariance exact)."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("sampled_basis"):
                buffer[buffer.abs() < _DENORMAL] = 0.0
