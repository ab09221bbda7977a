"""Group-convolutional encoder (paper section 3.3.1).

One large-kernel group convolution over P_r = translations x r discrete rotations (escnn ``rot2dOnR2(N=r)``,
trivial input field -> ``fields`` regular fields), LeakyReLU, then three 1x1 group convolutions: full ones
(``pointwise="group"``, escnn's), or rotation-shared ones (``"shared"``, the authors' code: one matrix applied to
every rotation channel alike, ``RotationSharedConv``). The last one
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

Speed and inference. With ``fast`` (``ModelConfig.kernels``) the layers run as plain torch ops on the filters escnn
expands (``tvae_em.model.plain_encoder``), otherwise as escnn's own modules; a checkpoint keeps those filters
(``exported_state``), so that inference runs without escnn.
"""

import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tvae_em.model.plain_encoder import (
    LEAKY_SLOPE,
    POINTWISE_LAYERS,
    CellEncoder,
    EncoderOutput,
    RotationSharedConv,
    output_fields,
    plain_group_conv,
    plain_state,
)

with warnings.catch_warnings():
    # escnn computes SO(3) Clebsch-Gordan coefficients with py3nj, and warns at import when it is missing; the
    # planar rotation groups here never need them, and bin/install leaves py3nj out where no Fortran compiler is
    warnings.filterwarnings("ignore", message="`py3nj` package not found", category=UserWarning)
    from escnn import gspaces
    from escnn import nn as enn

_DENORMAL = 1e-20  # escnn's sampled filter bases hold denormal floats that slow CPU convolutions ~1.6x
_OUTPUT_INIT_SCALE = 0.1  # initial weights of the posterior's location and scale fields, relative to escnn's


class GroupConvEncoder(CellEncoder):
    """y (B, 1, N, N) -> EncoderOutput. See the module docstring for the layers and the grid."""

    def __init__(self, rotations: int, z_dim: int, fields: int = 128, kernel: int = 28, padding: int = 8,
                 subpixel: bool = False, theta_logstd_init: float = 0.0, pointwise: str = "group", fast: bool = True):
        super().__init__(rotations, z_dim, kernel, padding, subpixel, pointwise)
        self.gspace = gspaces.rot2dOnR2(N=rotations)
        self.in_type = enn.FieldType(self.gspace, [self.gspace.trivial_repr])
        hidden = enn.FieldType(self.gspace, fields * [self.gspace.regular_repr])
        self.out_type = enn.FieldType(self.gspace, output_fields(z_dim, subpixel) * [self.gspace.regular_repr])
        layers = [enn.R2Conv(self.in_type, hidden, kernel_size=kernel, padding=padding)]
        # escnn's modules hold the group layers; rotation-shared ones are plain torch (state keys unchanged for
        # the group encoder, so that its older checkpoints load)
        self.shared = nn.ModuleList()
        if pointwise == "shared":
            sizes = [fields] * POINTWISE_LAYERS + [len(self.out_type)]
            self.shared.extend(RotationSharedConv(n_in, n_out) for n_in, n_out in itertools.pairwise(sizes))
        else:
            for out_type in [hidden] * (POINTWISE_LAYERS - 1) + [self.out_type]:
                layers += [enn.LeakyReLU(hidden, negative_slope=LEAKY_SLOPE, inplace=True),
                           enn.R2Conv(hidden, out_type, kernel_size=1)]
        self.net = enn.SequentialModule(*layers)
        _flush_denormal_bases(self.net)
        self._start_near_priors(theta_logstd_init)
        self._exported = None
        self.fast = fast  # False: run escnn's modules, the reference for the plain-torch path

    def _start_near_priors(self, theta_logstd: float) -> None:
        """Initialise the output layer so that q(theta | t, r) and q(z | t, r) start close to their priors.

        escnn's initialisation gives every output a spread of about 1-3 with extremes above 10 across the cells
        of a batch, so some cells started with sigma_z = exp(16): KL_z of 1e8 nats and samples of z that wrecked
        the first steps of training. Here every field but the attention logits gets its weights scaled by
        ``_OUTPUT_INIT_SCALE`` and its bias set to the prior's value (log sigma_theta = ``theta_logstd``, log
        sigma_z = 0, means 0); the logits keep escnn's initialisation, whose equivariant response to the image
        is what first tells the cells apart. Scaling whole fields keeps the layer exactly equivariant.
        """
        last = self.shared[-1] if self.shared else self.net[-1]
        fields = len(self.out_type)
        with torch.no_grad():
            weights = last.weight if self.shared else last.weights
            weights = weights.view(fields, -1)  # [out field, in fields x (escnn) basis]
            weights[1:] *= _OUTPUT_INIT_SCALE
            last.bias.zero_()
            last.bias[2] = theta_logstd  # field order: logits, theta_mu, theta_logstd, z_mu.., z_logstd.., shift..

    def export(self) -> None:
        """Freeze the expanded filters for inference (plain torch convolutions, no filter expansion per call).

        Call after training; ``train()`` drops the exported copy so training expands the filters again.
        """
        self.eval()
        with torch.no_grad():  # a frozen copy, not more parameters
            self._exported = [(weight.detach().clone(), bias.detach().clone()) for weight, bias in self._filters()]

    def exported_state(self) -> dict[str, torch.Tensor]:
        """The expanded filters as ``PlainEncoder`` holds them (CPU float32 copies), for checkpoints: expanded from
        the current weights as escnn expands them for eval mode, whatever this module's mode or autocast."""
        with torch.no_grad(), torch.autocast(self.net[0].weights.device.type, enabled=False):
            return plain_state([conv.expand_parameters() for conv in self._convs()]
                               + [layer.filter() for layer in self.shared])

    def train(self, mode: bool = True):
        if mode:
            self._exported = None
        return super().train(mode)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        if self.fast:
            out = plain_group_conv(images, self._filters(), self.padding, self.shared_over())
        else:
            out = self.net(enn.GeometricTensor(images, self.in_type)).tensor.float()
            if self.shared:
                out = self._shared_reference(out)
        return self.posterior_fields(out)

    def _shared_reference(self, first: torch.Tensor) -> torch.Tensor:
        """The rotation-shared layers as the authors' code writes them: 1x1x1 Conv3d over (B, fields, r, M, M)."""
        b, _, m, _ = first.shape
        h = first.view(b, -1, self.rotations, m, m)
        for layer in self.shared:
            weight, bias = layer.filter()
            h = F.conv3d(F.leaky_relu(h, LEAKY_SLOPE), weight[..., None], bias)
        return h.reshape(b, -1, m, m)

    def _filters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(filter, bias) of every layer as escnn expands them (rotation-shared layers: their matrices): frozen
        after ``export``, cached by escnn in eval mode, expanded from the trainable weights (differentiably) in
        training mode."""
        if self._exported is not None:
            return self._exported
        return [conv.expand_parameters() if conv.training else (conv.filter, conv.expanded_bias)
                for conv in self._convs()] + [layer.filter() for layer in self.shared]

    def _convs(self) -> list:
        return [m for m in self.net if isinstance(m, enn.R2Conv)]


def _flush_denormal_bases(module: nn.Module) -> None:
    """Zero the tiny entries of escnn's sampled filter bases once (keeps 90-degree equivariance exact)."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("sampled_basis"):
                buffer[buffer.abs() < _DENORMAL] = 0.0
