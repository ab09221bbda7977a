"""Whether a computation fits the device's memory, estimated before anything is allocated.

A configuration that cannot fit (a huge encoder kernel, generator, batch or render grid) would otherwise fail
after minutes with an out-of-memory error, be killed by the kernel without any message, or, for escnn's filter
basis, which grows as kernel^4, try to allocate terabytes while the model is built. The estimates count only
the tensors that dominate, so they are rough (within about a factor of 2), and ``check_fits`` refuses only what
exceeds the device's total memory: what could never run there.
"""

import os

import torch

from tvae_em.errors import UsageError
from tvae_em.model.plain_encoder import output_fields

FLOAT_BYTES = 4
_GIB = 2 ** 30


def model_bytes(config, batch_size: int = 0, training: bool = False, activation_bytes: int = FLOAT_BYTES) -> int:
    """Memory for the model of ``config`` (a ModelConfig) and, for ``batch_size`` images, the activations of a
    training step (kept for the backward pass) or of encoding (no gradients).

    Counted: escnn's sampled filter bases (about k^2 / 2 functions on the k x k grid for each of the R rotations
    in the first layer, measured for k = 5 to 49; R^3 values for each 1x1 group convolution), the filters
    expanded from them, the parameters (with gradients and Adam's two moments in training), the encoder's
    feature maps (channels x cells) and, in training, the generator's layer outputs at every pixel.
    ``activation_bytes`` is 2 under bfloat16 autocast.
    """
    r, kernel = config.rotations, config.encoder_kernel
    channels = config.encoder_fields * r
    out_channels = output_fields(config.z_dim, config.subpixel) * r
    cells = (config.image_size + 2 * config.encoder_padding - kernel + 1) ** 2
    pixels, width = config.image_size ** 2, config.generator_width
    shared = config.encoder_pointwise == "shared"  # 1x1 layers: one matrix per layer, no basis, r^2 fewer values
    pointwise = (2 * channels ** 2 + out_channels * channels) // (r * r if shared else 1)
    basis = r * kernel ** 4 // 2 + (0 if shared else 3 * r ** 3)
    filters = channels * kernel ** 2 + pointwise
    parameters = (config.encoder_fields * kernel ** 2 // 2 + (pointwise if shared else pointwise // r)
                  + width * (config.coordinate_inputs() + config.z_dim + (config.generator_depth - 1) * width))
    if training:
        per_image = (3 * channels + 2 * out_channels) * cells + pixels * width * (config.generator_depth + 1)
        values = basis + 2 * filters + 4 * parameters
    else:
        per_image = (2 * channels + out_channels) * cells
        values = basis + filters + parameters
    return FLOAT_BYTES * values + activation_bytes * batch_size * per_image


def device_memory(device: torch.device) -> int:
    """Total memory of a CUDA device, or of the machine for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(needed: int, device: torch.device, what: str, advice: str) -> None:
    """UsageError if ``needed`` bytes exceed the memory of ``device``: '<what> needs about X GiB ...; <advice>'."""
    available = device_memory(device)
    if needed > available:
        where = "this machine" if device.type == "cpu" else str(device)
        raise UsageError(f"{what} needs about {needed / _GIB:,.1f} GiB, more than the {available / _GIB:,.1f} GiB "
                         f"of {where}; {advice}")
