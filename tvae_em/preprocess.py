"""Turn RELION particle stacks or Topaz picks into one normalised float32 stack plus a RELION 3.1 STAR file.

Steps, applied chunk by chunk so that memory is bounded by ``chunk_size`` images, never by the stack:

1. Fourier cropping to ``box`` pixels (the ``-D`` of cryoDRGN): the centred ``box`` x ``box`` block of the
   2D spectrum is kept, which low-passes at the new Nyquist frequency and resamples without aliasing;
   the pixel size grows by old_box / box.
2. Optional contrast inversion (negative stain / dark-particle conventions).
3. Normalisation to zero mean and unit standard deviation of the background, i.e. the pixels outside the
   circle of radius box/2 (the particle is assumed inside it): per particle ('particle', RELION's
   behaviour), with one mean/std for the whole stack ('stack', estimated on up to 2,000 evenly spaced
   particles), or not at all ('none').
4. Optional soft circular mask: 1 inside radius box/2 - w, a raised-cosine edge of width w = max(2, box/16)
   pixels, 0 from box/2 out.

Outputs are ``out_dir/particles.mrcs`` and ``out_dir/particles.star``, which appear together or not at all.
The STAR file keeps every input column; ``_rlnImageName`` points into the new stack (path relative to the
working folder, as RELION writes it) and the previous image name is kept in ``_tvaeSourceImageName``.
"""

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import fft

from tvae_em import console, ctf
from tvae_em.errors import InputError, UsageError
from tvae_em.io.atomic import atomic_paths, refuse_overwriting
from tvae_em.io.columns import SOURCE_IMAGE_COLUMN
from tvae_em.io.mrc import StackWriter
from tvae_em.io.particles import ParticleTable
from tvae_em.io.picks import PickedBoxes, match_micrographs, read_picks
from tvae_em.io.relion import DEFAULT_PIXEL_SIZE, PHASE_FLIPPED, one_optics_group
from tvae_em.io.stack import image_names, open_particles, relion_path
from tvae_em.io.star import StarFile, format_values, new_relion31_star, write_star

NORMALIZE_MODES = ("particle", "stack", "none")
STACK_STATS_SAMPLE = 2000


def fourier_crop(images: np.ndarray, new_box: int) -> np.ndarray:
    """Downsample square images (..., N, N) to (..., n, n) by keeping the central n x n Fourier block.

    The (n/N)^2 factor keeps pixel values (not sums) unchanged, so a band-limited image is sampled exactly
    at the coarser grid: output pixel j lies at input pixel j * N / n, and the RELION centre N//2 stays
    the centre n//2.
    """
    images = np.asarray(images, dtype=np.float32)
    old_box = images.shape[-1]
    if new_box == old_box:
        return images
    spectrum = fft.fftshift(fft.fft2(images, workers=-1), axes=(-2, -1))
    low = old_box // 2 - new_box // 2
    spectrum = spectrum[..., low:low + new_box, low:low + new_box]
    cropped = fft.ifft2(fft.ifftshift(spectrum, axes=(-2, -1)), workers=-1).real
    return (cropped * (new_box / old_box) ** 2).astype(np.float32)


def _radius_px(box: int) -> np.ndarray:
    offsets = np.arange(box) - box // 2
    return np.hypot(offsets[:, None], offsets[None, :])


def background_mask(box: int) -> np.ndarray:
    """True on the pixels outside the circle of radius box/2 around the RELION centre (N//2, N//2)."""
    return _radius_px(box) >= box / 2


def soft_circular_mask(box: int, edge_px: float | None = None) -> np.ndarray:
    """1 inside radius box/2 - edge, raised-cosine fall-off over ``edge_px`` pixels, 0 beyond box/2."""
    edge = max(2.0, box / 16) if edge_px is None else float(edge_px)
    depth = np.clip((_radius_px(box) - (box / 2 - edge)) / edge, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * depth))).astype(np.float32)


@dataclass
class _Pipeline:
    """Crop, invert, normalise, mask one chunk (steps 1-4 of the module docstring)."""

    out_box: int
    normalize: str = "particle"
    invert: bool = False
    mask: bool = False
    flip_ctf: np.ndarray | None = None  # every particle's CTF at the output pixel size, to phase flip by
    stack_mean: float = 0.0
    stack_std: float = 1.0
    _background: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self._background = background_mask(self.out_box)
        if self.normalize != "none" and not self._background.any():
            raise UsageError(f"{self.out_box}x{self.out_box} px images have no pixel outside the particle circle "
                             "to normalise by; use larger images or --normalize none")

    def shaped(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        images = fourier_crop(images, self.out_box)
        if self.flip_ctf is not None:
            images = ctf.phase_flip(images, self.flip_ctf[indices])
        return -images if self.invert else images

    def fit_stack(self, source, chunk_size: int) -> None:
        """Whole-stack background mean/std from up to STACK_STATS_SAMPLE evenly spaced images."""
        sample = np.unique(np.linspace(0, len(source) - 1, min(len(source), STACK_STATS_SAMPLE)).astype(int))
        total = total_sq = count = 0.0
        for start in range(0, sample.size, chunk_size):
            chunk = sample[start:start + chunk_size]
            background = self.shaped(source.read(chunk), chunk)[:, self._background]
            total += background.sum(dtype=np.float64)
            total_sq += np.square(background, dtype=np.float64).sum()
            count += background.size
        self.stack_mean = total / count
        std = np.sqrt(max(total_sq / count - self.stack_mean ** 2, 0.0))
        self.stack_std = std if std > 0 else 1.0

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        images = self.shaped(images, indices)
        if self.normalize == "particle":
            background = images[:, self._background]
            mean = background.mean(axis=1, dtype=np.float64)
            std = background.std(axis=1, dtype=np.float64)
            std[std == 0] = 1.0
            images = (images - mean[:, None, None]) / std[:, None, None]
        elif self.normalize == "stack":
            images = (images - self.stack_mean) / self.stack_std
        if self.mask:
            images = images * soft_circular_mask(self.out_box)
        return images.astype(np.float32)


def _check_options(normalize: str, chunk_size: int) -> None:
    if normalize not in NORMALIZE_MODES:
        raise UsageError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not '{normalize}'")
    if chunk_size < 1:
        raise UsageError(f"chunk size must be positive, not {chunk_size}")


def _check_pixel_size(pixel_size: float | None) -> None:
    if pixel_size is not None and not (math.isfinite(pixel_size) and pixel_size > 0):
        raise UsageError(f"--apix {pixel_size}: the pixel size must be a positive, finite number of Angstrom")


def _target_box(box: int, target: int | None) -> int:
    if target is None:
        return box
    if target > box or target < 2 or target % 2:
        raise UsageError(f"cannot Fourier-crop {box} px images to {target} px (need an even size <= {box})")
    return int(target)


def _output_paths(out_dir, inputs) -> tuple[Path, Path]:
    star, stack = Path(out_dir) / "particles.star", Path(out_dir) / "particles.mrcs"
    refuse_overwriting([star, stack], inputs)
    return star, stack


def _stream(source, pipeline: _Pipeline, stack_path: Path, pixel_size: float, chunk_size: int) -> None:
    with StackWriter(stack_path, pixel_size) as writer, \
            console.progress(len(source), "preprocess", "image") as bar:
        for start in range(0, len(source), chunk_size):
            indices = np.arange(start, min(start + chunk_size, len(source)))
            writer.write(pipeline(source.read(indices), indices))
            bar.update(indices.size)


def preprocess_star(star_path, out_dir, box: int | None = None, normalize: str = "particle",
                    invert: bool = False, mask: bool = False, datadir=None, chunk_size: int = 1024,
                    phase_flip: bool = False, pixel_size: float | None = None) -> Path:
    """Preprocess the particles of a RELION STAR file (or a plain MRCS stack); returns the new STAR path.

    ``phase_flip``: multiply each image by the sign of its CTF (after cropping, at the new pixel size), which
    the output's optics record as ``rlnCtfDataArePhaseFlipped`` 1; the particles must carry defocus values and
    not be flipped already. ``pixel_size`` (Angstrom, of the input images) replaces a wrong or missing one of
    the STAR file or the stack headers, for every optics group, the CTF and the output."""
    _check_options(normalize, chunk_size)
    _check_pixel_size(pixel_size)
    particles = open_particles(star_path, datadir, pixel_size)
    out_box = _target_box(particles.box, box)
    star_out, stack_out = _output_paths(out_dir, [star_path, *particles.stack_paths])
    scale = particles.box / out_box
    pipeline = _Pipeline(out_box, normalize, invert, mask, _flip_ctf(particles, scale) if phase_flip else None)
    if normalize == "stack":
        pipeline.fit_stack(particles, chunk_size)
    with atomic_paths(star_out, stack_out) as (star_tmp, stack_tmp):
        _stream(particles, pipeline, stack_tmp, float(particles.pixel_sizes[0]) * scale, chunk_size)
        write_star(star_tmp, _restacked(particles.particle_table, stack_out, out_box, scale, phase_flip))
    return star_out


def _flip_ctf(particles, scale: float) -> np.ndarray:
    """The particles' CTF parameters at the pixel size of the cropped images, for phase flipping."""
    if particles.ctf is None:
        raise UsageError("--phase-flip: the particles carry no defocus values (_rlnDefocusU)")
    if particles.ctf_flipped:
        raise UsageError(f"--phase-flip: the images are phase flipped already ({PHASE_FLIPPED} in data_optics)")
    params = particles.ctf.copy()
    params[:, -1] *= scale  # the pixel size is the last column
    return params


def _restacked(table: ParticleTable, stack_path: Path, out_box: int, scale: float,
               phase_flipped: bool = False) -> StarFile:
    rows = table.star[table.block].copy()
    rows[SOURCE_IMAGE_COLUMN] = rows["rlnImageName"]
    rows["rlnImageName"] = image_names(len(rows), stack_path)
    optics = table.star["optics"].copy()
    if scale != 1:
        optics["rlnImagePixelSize"] = format_values(table.optics_pixel_sizes * scale)
    optics["rlnImageSize"] = str(out_box)
    if phase_flipped:
        optics[PHASE_FLIPPED] = "1"
    return table.star.replace(table.block, rows).replace("optics", optics)


def preprocess_picks(picks_path, micrographs_glob: str, box: int, out_dir, threshold: float | None = None,
                     downsample: int | None = None, normalize: str = "particle", invert: bool = False,
                     mask: bool = False, chunk_size: int = 1024, pixel_size: float | None = None,
                     pick_scale: float = 1.0) -> Path:
    """Extract ``box`` x ``box`` particles around Topaz picks, Fourier-crop them to ``downsample`` pixels
    (optional), normalise, and write the stack and STAR file.  ``pixel_size`` (Angstrom) overrides the
    micrographs' MRC header; ``pick_scale`` multiplies the pick coordinates (picks made on micrographs binned by
    it), and the output holds the scaled ones.  A note on stderr counts the picks whose box crosses the
    micrograph's edge, which are left out.  Returns the new STAR path."""
    _check_options(normalize, chunk_size)
    _check_pixel_size(pixel_size)
    if box < 2 or box % 2:
        raise UsageError(f"the extraction box must be an even number of pixels, not {box}")
    out_box = _target_box(box, downsample)
    table, x, y = read_picks(picks_path, threshold, pick_scale)
    micrographs, mic_id = match_micrographs(picks_path, table["rlnMicrographName"], micrographs_glob)
    star_out, stack_out = _output_paths(out_dir, [picks_path, *micrographs])
    boxes = PickedBoxes(micrographs, mic_id, x, y, box)
    if not len(boxes):
        scaled = f" at its coordinates times {pick_scale:g} (--pick-scale)" if pick_scale != 1 else ""
        raise InputError(picks_path, f"no pick left: {len(table)} pass the threshold, none has its "
                         f"{box} px box inside its micrograph{scaled}")
    note = boxes.edge_note()
    if note:
        console.note(note)
    apix = pixel_size or boxes.micrograph_pixel_size
    if not apix > 0:
        warnings.warn(f"no pixel size in the micrograph headers; assuming {DEFAULT_PIXEL_SIZE} A",
                      stacklevel=2)
        apix = DEFAULT_PIXEL_SIZE
    pipeline = _Pipeline(out_box, normalize, invert, mask)
    if normalize == "stack":
        pipeline.fit_stack(boxes, chunk_size)
    scale = box / out_box
    rows = table[boxes.kept].reset_index(drop=True)
    rows["rlnMicrographName"] = [relion_path(micrographs[i]) for i in mic_id[boxes.kept]]
    rows["rlnImageName"] = image_names(len(rows), stack_out)
    rows["rlnOpticsGroup"] = "1"
    with atomic_paths(star_out, stack_out) as (star_tmp, stack_tmp):
        _stream(boxes, pipeline, stack_tmp, apix * scale, chunk_size)
        write_star(star_tmp, new_relion31_star(one_optics_group(apix * scale, out_box), rows))
    return star_out
