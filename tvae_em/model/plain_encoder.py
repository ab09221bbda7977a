"""The encoder as plain torch ops on expanded filters: what training runs on escnn's filters, and what inference
runs without escnn.

``GroupConvEncoder`` (``tvae_em.model.encoder``) builds its layers from escnn modules and expands their filters;
``plain_group_conv`` runs the layers on those filters; ``PlainEncoder`` holds a frozen copy of them, the one a
checkpoint keeps (``GroupConvEncoder.exported_state``), so that ``embed`` and ``pose`` load a model without
importing escnn or sampling its filter bases. Both share ``CellEncoder``: the translation grid of the output cells
and the split of the output channels into the posterior's parameters.

Speed. ``plain_group_conv`` runs the big-kernel convolution in channels-last layout and the 1x1 group convolutions
as matrix products over the channel axis of that layout, and on CPU the first layer's filter gradient as a matrix
product over unfolded patches (``kernels.BigKernelConv``). The result is the convolution escnn's own modules compute
(``GroupConvEncoder`` with 'reference' kernels, what it is tested against), several times faster to train, in
bfloat16 above all (benchmarks/RESULTS.md, "Throughput").

Rotation-shared 1x1 layers (``encoder_pointwise = "shared"``, beyond the paper's text: what the authors' code does).
A full 1x1 group convolution between regular fields mixes every rotation channel of every input field; a shared
one applies one matrix W to each rotation channel on its own, the same for every rotation, which is the group
convolution whose filter is kron(W, I_r) and so exactly equivariant, with r times fewer multiply-adds. The plain
path runs it with the channels ordered rotation-major (rotation * fields + field, the first layer's filter rows
reordered once per call), so that the channels-last activations are (cells x r, fields) matrices without a copy.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tvae_em.config import POINTWISE_KINDS
from tvae_em.model.kernels import BigKernelConv

LEAKY_SLOPE = 0.01  # negative slope of escnn's LeakyReLU (its default), reproduced by the plain-torch path
_ROWS = 1 << 13  # cells per float32 product of the output layer in bfloat16 inference
POINTWISE_LAYERS = 3  # 1x1 group convolutions after the big-kernel one


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


def output_fields(z_dim: int, subpixel: bool) -> int:
    """Regular fields of the last layer: logit, mu_theta, log sigma_theta, mu_z and log sigma_z (z_dim each), and
    with sub-pixel translation the offset (2) and its log sigma."""
    return 3 + 2 * z_dim + (3 if subpixel else 0)


class CellEncoder(nn.Module):
    """What both encoders share: the grid of their output cells and the reading of their output channels."""

    def __init__(self, rotations: int, z_dim: int, kernel: int, padding: int, subpixel: bool,
                 pointwise: str = "group"):
        super().__init__()
        if pointwise not in POINTWISE_KINDS:
            raise ValueError(f"pointwise must be one of {', '.join(POINTWISE_KINDS)}, not {pointwise!r}")
        self.rotations, self.z_dim, self.kernel, self.padding = rotations, z_dim, kernel, padding
        self.subpixel, self.pointwise = subpixel, pointwise

    def shared_over(self) -> int | None:
        """``plain_group_conv``'s ``shared_over``: the rotations when the 1x1 layers are shared, else None."""
        return self.rotations if self.pointwise == "shared" else None

    def grid_size(self, image_size: int) -> int:
        return image_size + 2 * self.padding - self.kernel + 1

    def grid(self, image_size: int) -> torch.Tensor:
        """Translation of every output cell in the generator frame, (M, M, 2) as (x, y) (``tvae_em.model.encoder``
        explains the grid)."""
        m = self.grid_size(image_size)
        centre_px = torch.arange(m, dtype=torch.float64) - self.padding + (self.kernel - 1) / 2
        coord = ((centre_px - image_size // 2) / (image_size / 2)).float()
        rows, cols = torch.meshgrid(coord, coord, indexing="ij")
        return torch.stack([cols, rows], dim=-1)

    def posterior_fields(self, out: torch.Tensor) -> EncoderOutput:
        """The last layer's output (B, C, M, M) read as the posterior's parameters."""
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


class RotationSharedConv(nn.Module):
    """A rotation-shared 1x1 layer (module docstring): ``weight`` (fields_out, fields_in) and one bias per output
    field, applied to every rotation channel alike.

    Initialised at the scale escnn gives its 1x1 group convolutions (each output channel's squared weights sum to
    about 1, over the fields here rather than fields x r channels), so that both kinds start alike.
    """

    def __init__(self, fields_in: int, fields_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fields_out, fields_in) / fields_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(fields_out))

    def filter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight as a 1x1 filter (fields_out, fields_in, 1, 1), bias): a layer of ``plain_group_conv``."""
        return self.weight[..., None, None], self.bias


class PlainEncoder(CellEncoder):
    """The exported encoder without escnn: frozen expanded filters (buffers ``weight0``, ``bias0``, ... as
    ``GroupConvEncoder.exported_state`` writes them) run by ``plain_group_conv``. Inference only."""

    def __init__(self, rotations: int, z_dim: int, fields: int, kernel: int, padding: int, subpixel: bool = False,
                 pointwise: str = "group"):
        super().__init__(rotations, z_dim, kernel, padding, subpixel, pointwise)
        out = output_fields(z_dim, subpixel)
        per_field = 1 if pointwise == "shared" else rotations  # channels of a field a 1x1 layer's matrix sees
        hidden, out = fields * per_field, out * per_field
        shapes = [(fields * rotations, 1, kernel, kernel), *[(hidden, hidden, 1, 1)] * (POINTWISE_LAYERS - 1),
                  (out, hidden, 1, 1)]
        for layer, shape in enumerate(shapes):
            self.register_buffer(f"weight{layer}", torch.zeros(shape))
            self.register_buffer(f"bias{layer}", torch.zeros(shape[0]))

    def export(self) -> None:
        """Nothing to do: the filters are the exported ones (``GroupConvEncoder.export`` has the same name)."""

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        filters = [(getattr(self, f"weight{layer}"), getattr(self, f"bias{layer}"))
                   for layer in range(POINTWISE_LAYERS + 1)]
        return self.posterior_fields(plain_group_conv(images, filters, self.padding, self.shared_over()))


def plain_state(filters: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Expanded (filter, bias) pairs, layer by layer, as ``PlainEncoder``'s state: CPU float32 copies."""
    state = {}
    for layer, (weight, bias) in enumerate(filters):
        state[f"weight{layer}"] = weight.detach().float().cpu().clone()
        state[f"bias{layer}"] = bias.detach().float().cpu().clone()
    return state


def plain_group_conv(images: torch.Tensor, filters: list, padding: int, shared_over: int | None = None
                     ) -> torch.Tensor:
    """The encoder's layers on expanded filters: big-kernel conv, then LeakyReLU + 1x1 conv three times.

    Channels-last layout throughout: the first convolution writes (B, M, M, C) memory, on which each 1x1 group
    convolution is one matrix product (``F.linear``) over the channel axis. Activations are applied in place on
    whole tensors (never on views, which would make autograd copy their gradients back into the base), so
    autograd keeps one tensor per layer. ``shared_over``: the number of rotations when the 1x1 layers' filters
    are rotation-shared matrices (fields_out, fields_in, 1, 1), see the module docstring. Returns float32
    (B, C_out, M, M), channels field-major (field * r + rotation) either way.
    """
    (first, first_bias), *pointwise = filters
    if shared_over:
        first, first_bias = _rotation_major(first, shared_over), _rotation_major(first_bias, shared_over)
    if _first_layer_channels_last(images.device.type):
        # .to, not .contiguous: with one input channel both layouts count as contiguous, and only explicit
        # channels-last strides make the convolution write channels-last output
        images, first = images.to(memory_format=torch.channels_last), first.to(memory_format=torch.channels_last)
    if images.device.type == "cpu" and torch.is_grad_enabled() and first.requires_grad:
        h = BigKernelConv.apply(images, first, first_bias, padding)
    else:
        h = F.conv2d(images, first, first_bias, padding=padding)
    b, _, m, _ = h.shape
    # (B M M, C): a view of channels-last output, a copy of NCHW output
    h = F.leaky_relu(h, LEAKY_SLOPE, inplace=True).permute(0, 2, 3, 1).reshape(b * m * m, -1)
    if shared_over:  # each cell's r rotations become r rows of `fields` channels (a view, as a rule)
        h = h.reshape(b * m * m * shared_over, -1)
    *hidden, (last, last_bias) = pointwise
    for weight, bias in hidden:
        h = F.leaky_relu(F.linear(h, weight.flatten(1), bias), LEAKY_SLOPE, inplace=True)
    h = _output_layer(h, last.flatten(1), last_bias)
    # one pass for both the layout and the cast: the posterior works in float32 on every cell
    if shared_over:  # (B M M r, fields) -> (B, fields, r, M, M), field-major
        return h.view(b, m, m, shared_over, -1).permute(0, 4, 3, 1, 2).reshape(b, -1, m, m).float()
    return h.view(b, m, m, -1).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)


def _rotation_major(values: torch.Tensor, rotations: int) -> torch.Tensor:
    """First-layer filter rows (or biases) from escnn's field-major order (field * r + rotation) to rotation-major
    (rotation * fields + field), in which each rotation's channels are contiguous."""
    return values.view(-1, rotations, *values.shape[1:]).transpose(0, 1).reshape(values.shape)


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
