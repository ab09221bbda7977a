"""The contrast transfer function (CTF) of every particle, from its STAR values, as RELION computes it.

For a spatial frequency u = (u_x, u_y) in 1/Å, |u| = s, at direction phi = atan2(u_y, u_x):

    CTF(u)     = scale * exp(-B s^2 / 4) * -sin(gamma(u))
    gamma(u)   = -pi lambda Delta_f(phi) s^2 + pi/2 Cs lambda^3 s^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    Delta_f    = (dU + dV) / 2 + (dU - dV) / 2 * cos(2 (phi - angle))

with dU, dV the defocus (Å, positive for underfocus: rlnDefocusU, rlnDefocusV), angle = rlnDefocusAngle, the
phase shift rlnPhaseShift, B = rlnCtfBfactor, scale = rlnCtfScalefactor, Q0 = rlnAmplitudeContrast, Cs =
rlnSphericalAberration (mm, 1e7 Å) and lambda the relativistic electron wavelength at rlnVoltage (kV). At s = 0
the CTF is +Q0-ish and it stays positive up to its first zero, as in RELION: particles are expected bright.

Axes. u_x runs along the image's columns (increasing column index) and u_y along its rows (increasing row
index), as RELION indexes an MRC image, and rlnDefocusAngle is measured from the x axis towards the y axis:
defocus dU holds along that direction, dV across it. The astigmatism belongs to the micrograph: it does not turn
with the particle's in-plane pose, which is why the model multiplies the posed generator image, not the
canonical one, by the CTF.

The parameters are read from the STAR file by ``io.particles.ParticleTable.ctf``; the CTF is evaluated at each
particle's image pixel size (after ``preprocess -D``, the new one) on the box of the images it applies to.
"""

import math

import numpy as np
import torch

from tvae_em import console
from tvae_em.config import CTF_REQUESTS, ModelConfig
from tvae_em.errors import InputError, UsageError
from tvae_em.io.relion import CTF_COLUMNS

N_COLUMNS = len(CTF_COLUMNS) + 1  # the parameters of io.relion.CTF_COLUMNS, then the pixel size (Å)
_ANGLE = [name for name, _, _ in CTF_COLUMNS].index("angle_deg")  # the astigmatism angle's column


def electron_wavelength(voltage_kv):
    """Relativistic wavelength of electrons accelerated by ``voltage_kv`` kilovolts, in Å."""
    volts = voltage_kv * 1e3
    return 12.2643247 / (volts * (1 + 0.978466e-6 * volts)) ** 0.5


def evaluate(params: torch.Tensor, u_x: torch.Tensor, u_y: torch.Tensor) -> torch.Tensor:
    """CTF values for particles ``params`` (B, N_COLUMNS) at frequencies (u_x, u_y) in cycles per pixel,
    broadcastable to (B, ...) after the batch axis: returns (B, *frequencies.shape) in float64 or float32 as
    ``params``."""
    p = params.reshape(len(params), *([1] * u_x.dim()), N_COLUMNS).unbind(-1)
    defocus_u, defocus_v, angle_deg, voltage_kv, cs_mm, q0, phase_deg, bfactor, scale, pixel_size = p
    u_x, u_y = u_x / pixel_size, u_y / pixel_size  # 1/Å
    s2 = u_x ** 2 + u_y ** 2
    wavelength = electron_wavelength(voltage_kv)
    direction = torch.atan2(u_y, u_x) - torch.deg2rad(angle_deg)
    defocus = 0.5 * (defocus_u + defocus_v) + 0.5 * (defocus_u - defocus_v) * torch.cos(2 * direction)
    gamma = (-math.pi * wavelength * defocus * s2 + 0.5 * math.pi * cs_mm * 1e7 * wavelength ** 3 * s2 ** 2
             - torch.deg2rad(phase_deg) - torch.atan(q0 / torch.sqrt(1 - q0 ** 2)))
    return -scale * torch.exp(-bfactor * s2 / 4) * torch.sin(gamma)


def rfft_frequencies(box: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_x, u_y), (box, box // 2 + 1) each in cycles per pixel: the frequencies of ``torch.fft.rfft2`` of a
    box x box image whose rows are y and columns x."""
    u_y = torch.fft.fftfreq(box, device=device, dtype=torch.float64)[:, None]
    u_x = torch.fft.rfftfreq(box, device=device, dtype=torch.float64)[None, :]
    return u_x.expand(box, -1), u_y.expand(-1, box // 2 + 1)


def transfer(params: torch.Tensor, box: int, mode: str) -> torch.Tensor:
    """What multiplies the spectrum of a posed generator image (``ModelConfig.ctf``): the CTF ('full') or its
    magnitude ('flipped', for images already multiplied by the sign of theirs), (B, box, box // 2 + 1) float32."""
    u_x, u_y = rfft_frequencies(box, params.device)
    values = evaluate(params.double(), u_x, u_y)
    return (values.abs() if mode == "flipped" else values).float()


def through_ctf(images: np.ndarray, params: np.ndarray, flipped: bool = False) -> np.ndarray:
    """Images (n, N, N) multiplied in Fourier space by their CTF, as a microscope records them (simulations), or
    by its magnitude with ``flipped`` (the CTF weighting of images already multiplied by the sign of theirs)."""
    values = rfft_values(params, images.shape[-1])
    return _multiply_spectra(images, np.abs(values) if flipped else values)


def phase_flip(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Images (n, N, N) multiplied in Fourier space by the sign of their CTF: each ring's contrast made
    positive, the cheap correction that leaves |CTF| in the images (``preprocess --phase-flip``)."""
    return _multiply_spectra(images, np.sign(rfft_values(params, images.shape[-1])))


def rfft_values(params: np.ndarray, box: int) -> np.ndarray:
    """The CTF of particles ``params`` (n, N_COLUMNS) on the ``rfft_frequencies`` grid: (n, box, box // 2 + 1)
    float64."""
    return evaluate(torch.from_numpy(np.asarray(params, np.float64)), *rfft_frequencies(box)).numpy()


def in_aligned_frame(params: np.ndarray, psi_deg) -> np.ndarray:
    """The CTF parameters of particles as their images are seen once aligned by RELION's in-plane pose
    (``poses.align_image``: shift by +origin, then rotate by +psi).

    Aligning turns an image's spectrum with it, K^(u) = I^(R(psi)^T u) up to a phase from the shift, so its CTF
    becomes CTF(R(psi)^T u), whose direction is that of u less psi: the same CTF with its astigmatism angle
    (rlnDefocusAngle, fixed in the micrograph) turned by +psi. Exact, where rotating a sampled CTF would
    interpolate it."""
    params = np.array(params, dtype=np.float64)
    params[:, _ANGLE] += np.asarray(psi_deg, dtype=np.float64)
    return params


def _multiply_spectra(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    spectrum = np.fft.rfft2(np.asarray(images, np.float64))
    return np.fft.irfft2(spectrum * factors, s=images.shape[-2:]).astype(np.float32)


# --- which CTF a model applies ----------------------------------------------------------------------------

def particle_ctf(particles, config: ModelConfig) -> np.ndarray | None:
    """Every particle's CTF parameters when the model applies a CTF (None otherwise); UsageError when the
    particles carry none, or when phase-flipped images would meet a model of the full CTF or the reverse."""
    if config.ctf == "none":
        return None
    if particles.ctf is None:
        raise UsageError("the model applies a CTF but the particles carry no defocus values (_rlnDefocusU)")
    expected = "flipped" if particles.ctf_flipped else "full"
    if config.ctf != expected:
        raise UsageError(f"the model applies the {config.ctf} CTF but the images are "
                         f"{'' if particles.ctf_flipped else 'not '}phase flipped")
    return particles.ctf


def ctf_mode(request: str, particles, note: bool = True) -> str:
    """``ModelConfig.ctf`` for a ``train --ctf`` request: 'auto' models the CTF when the particles carry defocus
    values (its magnitude when their images were phase flipped), 'on' insists on it (UsageError without defocus
    values), 'none' leaves it out (with a ``note`` on stderr when defocus values are there and the images are
    not phase flipped: the latents will then follow defocus as well as structure)."""
    if request not in CTF_REQUESTS:
        raise UsageError(f"--ctf must be one of {', '.join(CTF_REQUESTS)}, not {request!r}")
    if request == "on" and particles.ctf is None:
        raise UsageError("--ctf on: the particles carry no defocus values (_rlnDefocusU)")
    if request == "none":
        if note and _carries_defocus(particles) and not particles.ctf_flipped:
            console.note("note: the particles carry defocus values but the CTF is neither modelled (--ctf none) "
                         "nor corrected (preprocess --phase-flip): latents and clusters will follow defocus too")
        return "none"
    if particles.ctf is None:
        return "none"
    return "flipped" if particles.ctf_flipped else "full"


def _carries_defocus(particles) -> bool:
    """Whether the particles have defocus values, also where the rest of a CTF is missing (which only a model of
    the CTF needs: ``--ctf none`` trains on such a STAR)."""
    try:
        return particles.ctf is not None
    except InputError:
        return True
