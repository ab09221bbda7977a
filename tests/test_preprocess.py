import os

import mrcfile
import numpy as np
import pytest
import starfile
from console_lines import message_lines

from tvae_em.errors import InputError, UsageError
from tvae_em.preprocess import (
    background_mask,
    fourier_crop,
    preprocess_picks,
    preprocess_star,
    soft_circular_mask,
)


def band_limited(box, positions, frequencies, phases):
    """sum_k cos(2 pi (fx col + fy row) / box + phase), evaluated at arbitrary (row, col) positions."""
    rows, cols = positions
    return sum(np.cos(2 * np.pi * (fx * cols + fy * rows) / box + phase)
               for (fx, fy), phase in zip(frequencies, phases, strict=True))


def test_fourier_crop_of_a_band_limited_image_is_the_analytic_downsampling():
    old_box, new_box = 64, 24
    frequencies, phases = [(1, 0), (3, -2), (-5, 7), (11, 4), (-2, -11)], [0.3, 1.1, -0.7, 2.0, 0.0]
    image = band_limited(old_box, np.mgrid[:old_box, :old_box].astype(float), frequencies, phases)
    coarse = np.mgrid[:new_box, :new_box] * (old_box / new_box)  # output pixel j sits at input pixel j N / n
    expected = band_limited(old_box, coarse, frequencies, phases)
    cropped = fourier_crop(np.stack([image, 2 * image]).astype(np.float32), new_box)
    assert cropped.shape == (2, new_box, new_box) and cropped.dtype == np.float32
    np.testing.assert_allclose(cropped[0], expected, atol=1e-4)
    np.testing.assert_allclose(cropped[1], 2 * expected, atol=2e-4)
    np.testing.assert_array_equal(fourier_crop(image[None].astype(np.float32), old_box)[0],
                                  image.astype(np.float32))


def test_masks():
    background = background_mask(64)
    assert background[0, 0] and background[32, 0] and not background[32, 1] and not background[32, 32]
    mask = soft_circular_mask(64)
    assert mask[32, 32] == 1.0 and mask[0, 0] == 0.0 and mask[32, 0] == 0.0
    edge = mask[32, :6]  # radius 32 down to 27; the 4 px raised-cosine edge spans radius 32 -> 28
    assert edge[0] == 0.0 and np.all(np.diff(edge) >= 0) and np.all((edge[1:4] > 0) & (edge[1:4] < 1))
    assert edge[4] == edge[5] == 1.0


@pytest.fixture
def particles_star(tmp_path, make_stack):
    rng = np.random.default_rng(0)
    stacks = {"Extract/a.mrcs": (rng.normal(3.0, 2.0, (5, 32, 32))).astype(np.float32),
              "Extract/b.mrcs": (rng.normal(-1.0, 0.5, (4, 32, 32))).astype(np.float32)}
    for name, images in stacks.items():
        make_stack(name, images, apix=9.0)
    names = [f"{i}@Extract/a.mrcs" for i in range(1, 6)] + [f"{i:06d}@Extract/b.mrcs" for i in (4, 1, 2)]
    rows = "\n".join(f"{name} 1 {i * 1.5:.6f} -12.345678" for i, name in enumerate(names))
    star = tmp_path / "particles.star"
    star.write_text("# version 30001\ndata_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n"
                    "_rlnImagePixelSize\n_rlnImageSize\n1 opticsGroup1 1.25 32\n\n"
                    "# version 30001\ndata_particles\nloop_\n"
                    f"_rlnImageName\n_rlnOpticsGroup\n_rlnCoordinateX\n_rlnAnglePsi\n{rows}\n")
    inputs = np.stack([stacks[n.split("@")[1]][int(n.split("@")[0]) - 1] for n in names])
    return star, inputs


def read_output(star_path):
    blocks = starfile.read(star_path, always_dict=True)
    stack = blocks["particles"]["rlnImageName"][0].split("@")[1]
    with mrcfile.open(stack if os.path.isabs(stack) else os.path.join(os.getcwd(), stack)) as mrc:
        return blocks, mrc.data.copy(), float(mrc.voxel_size.x)


def test_preprocess_star_crops_normalises_and_keeps_columns(tmp_path, particles_star):
    star, inputs = particles_star
    out = preprocess_star(star, tmp_path / "prep", box=16, chunk_size=3)
    assert out == tmp_path / "prep" / "particles.star"
    blocks, images, header_apix = read_output(out)
    source = starfile.read(star, always_dict=True)
    particles = blocks["particles"]
    for column in source["particles"].columns:
        if column != "rlnImageName":
            assert particles[column].tolist() == source["particles"][column].tolist()
    assert particles["tvaeSourceImageName"].tolist() == source["particles"]["rlnImageName"].tolist()
    assert particles["rlnImageName"].tolist()[-1] == f"000008@{tmp_path / 'prep' / 'particles.mrcs'}"
    assert blocks["optics"]["rlnImagePixelSize"][0] == 2.5 and blocks["optics"]["rlnImageSize"][0] == 16
    assert header_apix == pytest.approx(2.5)

    assert images.shape == (8, 16, 16) and images.dtype == np.float32
    background = images[:, background_mask(16)]
    np.testing.assert_allclose(background.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(background.std(axis=1), 1.0, atol=1e-5)
    cropped = fourier_crop(inputs, 16)
    corr = [np.corrcoef(images[i].ravel(), cropped[i].ravel())[0, 1] for i in range(8)]
    assert min(corr) > 0.999  # each output is its own input, rescaled


def test_stack_normalisation_inversion_and_mask(tmp_path, particles_star):
    star, inputs = particles_star
    plain = read_output(preprocess_star(star, tmp_path / "plain", normalize="none"))[1]
    np.testing.assert_allclose(plain, inputs, atol=1e-6)
    inverted = read_output(preprocess_star(star, tmp_path / "inv", normalize="none", invert=True))[1]
    np.testing.assert_allclose(inverted, -inputs, atol=1e-6)

    stacked = read_output(preprocess_star(star, tmp_path / "stack", normalize="stack"))[1]
    background = inputs[:, background_mask(32)]
    mean, std = background.mean(dtype=np.float64), background.std(dtype=np.float64)
    np.testing.assert_allclose(stacked, (inputs - mean) / std, atol=1e-4)
    assert stacked[:, background_mask(32)].mean() == pytest.approx(0.0, abs=1e-5)
    assert stacked[:, background_mask(32)].std() == pytest.approx(1.0, abs=1e-5)

    masked = read_output(preprocess_star(star, tmp_path / "mask", normalize="none", mask=True))[1]
    np.testing.assert_allclose(masked, inputs * soft_circular_mask(32), atol=1e-6)
    assert not masked[:, background_mask(32)].any()


def test_refuses_to_overwrite_inputs_and_bad_options(tmp_path, particles_star):
    star, _ = particles_star
    with pytest.raises(UsageError, match="is also an input"):
        preprocess_star(star, tmp_path)
    with pytest.raises(UsageError, match="normalize must be one of"):
        preprocess_star(star, tmp_path / "x", normalize="global")
    with pytest.raises(UsageError, match="cannot Fourier-crop 32 px images to 48 px"):
        preprocess_star(star, tmp_path / "x", box=48)
    with pytest.raises(UsageError, match="to 15 px"):
        preprocess_star(star, tmp_path / "x", box=15)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_preprocess_picks_extracts_filters_and_records(tmp_path, make_stack):
    rng = np.random.default_rng(1)
    micrographs = {name: rng.normal(size=(80, 100)).astype(np.float32) for name in ("m1", "m2")}
    for name, data in micrographs.items():
        make_stack(f"mics/{name}.mrc", data, apix=1.1)
    picks = tmp_path / "picks.txt"
    picks.write_text("image_name\tx_coord\ty_coord\tscore\n"
                     "m1\t20\t30\t5.0\n"     # kept
                     "m1\t50\t40\t-3.0\n"    # below threshold
                     "m2\t95\t40\t4.0\n"     # box off the right edge
                     "m2\t60\t70\t1.0\n")    # kept (box rows 62..77)
    out = preprocess_picks(picks, str(tmp_path / "mics/*.mrc"), 16, tmp_path / "prep", threshold=0.0,
                           downsample=8, normalize="none")
    blocks, images, header_apix = read_output(out)
    particles = blocks["particles"]
    assert particles["rlnCoordinateX"].tolist() == [20, 60]
    assert particles["rlnCoordinateY"].tolist() == [30, 70]
    assert particles["rlnAutopickFigureOfMerit"].tolist() == [5.0, 1.0]
    assert [os.path.basename(name) for name in particles["rlnMicrographName"]] == ["m1.mrc", "m2.mrc"]
    assert particles["rlnOpticsGroup"].tolist() == [1, 1]
    assert blocks["optics"]["rlnImagePixelSize"][0] == pytest.approx(2.2)
    assert header_apix == pytest.approx(2.2)
    expected = fourier_crop(np.stack([micrographs["m1"][22:38, 12:28], micrographs["m2"][62:78, 52:68]]), 8)
    np.testing.assert_allclose(images, expected, atol=1e-5)

    with pytest.raises(InputError, match="no pick left"):
        preprocess_picks(picks, str(tmp_path / "mics/*.mrc"), 16, tmp_path / "none", threshold=100.0)
    with pytest.raises(UsageError, match="even number of pixels"):
        preprocess_picks(picks, str(tmp_path / "mics/*.mrc"), 15, tmp_path / "odd")


# --- preprocess --apix: a wrong or missing pixel size replaced (issue 14) ------------------------------------------

RELION30_WITH_ORIGINS = """
data_

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnMagnification #6
_rlnDetectorPixelSize #7
_rlnDefocusU #8
_rlnOriginX #9
_rlnOriginY #10
_rlnAnglePsi #11
000001@Particles/mic1.mrcs mic1.mrc 300.000000 2.700000 0.100000 100000.000000 14.000000 10000.5 -3.30401 1.5 12.0
000002@Particles/mic1.mrcs mic1.mrc 300.000000 2.700000 0.100000 100000.000000 14.000000 10001.5 2.0 -1.0 13.0
000003@Particles/mic1.mrcs mic1.mrc 300.000000 2.700000 0.100000 100000.000000 14.000000 10003.5 0.5 0.25 15.0
"""


def tvae_em(argv, capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines (progress lines aside) of ``tvae-em argv``."""
    from tvae_em.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, message_lines(capsys.readouterr().err)


def test_apix_replaces_the_pixel_size_of_a_relion31_star_and_its_headers(tmp_path, particles_star, capsys):
    star, _ = particles_star  # optics say 1.25 A, the stack headers 9 A
    code, lines = tvae_em(["preprocess", str(star), "-o", str(tmp_path / "prep"), "-D", "16", "--apix", "3.1"],
                          capsys)
    assert code == 0, lines
    blocks, _, header_apix = read_output(tmp_path / "prep" / "particles.star")
    assert blocks["optics"]["rlnImagePixelSize"][0] == pytest.approx(6.2) and header_apix == pytest.approx(6.2)


def test_apix_replaces_a_relion30_pixel_size_before_origins_become_angstrom(tmp_path, make_stack, capsys):
    make_stack("Particles/mic1.mrcs", np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32),
               apix=0.0)  # a header without a pixel size
    star = tmp_path / "particles.star"
    star.write_text(RELION30_WITH_ORIGINS)  # magnification and detector pixel: 1.4 A, the wrong one here
    code, lines = tvae_em(["preprocess", str(star), "-o", str(tmp_path / "prep"), "--apix", "2"], capsys)
    assert code == 0 and not any(line.startswith("warning") for line in lines), lines
    blocks, _, header_apix = read_output(tmp_path / "prep" / "particles.star")
    assert blocks["optics"]["rlnImagePixelSize"].tolist() == [2.0] and header_apix == pytest.approx(2.0)
    assert blocks["particles"]["rlnOriginXAngst"].tolist() == pytest.approx([-6.60802, 4.0, 1.0])
    assert blocks["particles"]["rlnOriginYAngst"].tolist() == pytest.approx([3.0, -2.0, 0.5])


@pytest.mark.parametrize("value", ["0", "-1.5", "nan", "inf"])
def test_apix_must_be_a_positive_finite_number(tmp_path, particles_star, capsys, value):
    star, _ = particles_star
    code, lines = tvae_em(["preprocess", str(star), "-o", str(tmp_path / "prep"), "--apix", value], capsys)
    assert code == 2 and lines == [f"error: --apix {float(value)}: the pixel size must be a positive, finite "
                                   "number of Angstrom"]
    assert not (tmp_path / "prep").exists()
