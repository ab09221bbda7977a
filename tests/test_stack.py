import os
import pickle
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from tvae_em.errors import InputError
from tvae_em.io.stack import open_particles, write_stack
from tvae_em.io.star import write_star

BOX = 16


def star_31(names, groups=None, optics_rows=("1 opticsGroup1 1.500000 300.0",), image_size=None):
    """RELION 3.1 text: one particle row per image name."""
    groups = groups or [1] * len(names)
    size_label = "_rlnImageSize\n" if image_size else ""
    optics = "\n".join(row + (f" {image_size}" if image_size else "") for row in optics_rows)
    rows = "\n".join(f"{name} {group} {10.0 * i:.6f}"
                     for i, (name, group) in enumerate(zip(names, groups, strict=True)))
    return ("# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n"
            f"_rlnImagePixelSize\n_rlnVoltage\n{size_label}{optics}\n\n# version 30001\n\ndata_particles\n\n"
            f"loop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnCoordinateX\n{rows}\n")


def random_images(n, seed, box=BOX):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


@pytest.fixture
def two_stacks(tmp_path, make_stack):
    stacks = {"Extract/a.mrcs": random_images(5, 1), "Extract/b.mrcs": random_images(3, 2)}
    for name, images in stacks.items():
        make_stack(name, images, apix=3.0)
    return stacks


def test_reads_rows_from_many_stacks_in_any_order(tmp_path, two_stacks):
    names = ["000003@Extract/a.mrcs", "1@Extract/b.mrcs", "0001@Extract/a.mrcs", "000002@Extract/a.mrcs",
             "3@Extract/b.mrcs", "5@Extract/a.mrcs"]
    (tmp_path / "p.star").write_text(star_31(names))
    expected = np.stack([two_stacks[f"Extract/{n.split('@')[1].split('/')[1]}"][int(n.split("@")[0]) - 1]
                         for n in names])
    with open_particles(tmp_path / "p.star") as particles:
        assert len(particles) == 6 and particles.box == BOX
        assert particles.pixel_size == 1.5  # the STAR optics table wins over the MRC header's 3.0 A
        np.testing.assert_array_equal(particles.read(np.arange(6)), expected)
        order = np.array([5, 0, 0, 3, 2, 4, 1])
        np.testing.assert_array_equal(particles.read(order), expected[order])
        assert particles.read([]).shape == (0, BOX, BOX)
        clone = pickle.loads(pickle.dumps(particles))
        np.testing.assert_array_equal(clone.read([4]), expected[[4]])


@pytest.mark.parametrize("dtype, mode", [(np.float32, 2), (np.int16, 1), (np.float16, 12), (np.int8, 0),
                                         (np.uint16, 6)])
def test_supported_mrc_modes(tmp_path, make_stack, dtype, mode):
    images = (np.arange(3 * BOX * BOX).reshape(3, BOX, BOX) % 100).astype(dtype)
    path = make_stack("s.mrcs", images, apix=2.0)
    with mrcfile.open(path, header_only=True) as mrc:
        assert int(mrc.header.mode) == mode
    with open_particles(path) as particles:  # a plain stack without a STAR file
        assert len(particles) == 3 and particles.pixel_size == 2.0
        out = particles.read([2, 0])
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, images[[2, 0]].astype(np.float32))
        write_star(tmp_path / "out.star", particles.table)
    back = starfile.read(tmp_path / "out.star", always_dict=True)
    assert back["particles"]["rlnImageName"].tolist()[2] == f"000003@{os.path.abspath(path)}"
    assert back["optics"]["rlnImagePixelSize"][0] == 2.0 and back["optics"]["rlnImageSize"][0] == BOX


def strip_stamps(path: Path):
    raw = bytearray(path.read_bytes())
    raw[208:216] = bytes(8)  # 'MAP ' and the machine stamp
    path.write_bytes(bytes(raw))


def test_missing_map_and_machine_stamp_warns_once_and_reads(tmp_path, two_stacks):
    for name in two_stacks:
        strip_stamps(tmp_path / name)
    (tmp_path / "p.star").write_text(star_31(["1@Extract/a.mrcs", "2@Extract/b.mrcs"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        particles = open_particles(tmp_path / "p.star")
    assert len(caught) == 1 and "2 MRC file(s) lack the 'MAP ' or machine stamp" in str(caught[0].message)
    np.testing.assert_array_equal(particles.read([1]), two_stacks["Extract/b.mrcs"][[1]])


def test_lazy_access_of_a_large_stack(tmp_path):
    """A 212 MB stack (sparse on disk) is opened and sampled without reading or mapping it whole."""
    path, shape = tmp_path / "big.mrcs", (5300, 100, 100)
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=2) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = 1.1
        mrc.data[4321] = 7.0
    try:
        io_before, rss_before = read_io_bytes(), resident_bytes()
        with open_particles(path) as particles:
            images = particles.read([4321, 17, 5299])
        io_growth, rss_growth = read_io_bytes() - io_before, resident_bytes() - rss_before
        assert images[0].min() == images[0].max() == 7.0 and not images[1:].any()
        assert io_growth < 20e6 and rss_growth < 50e6, (io_growth, rss_growth)
    finally:
        path.unlink()


def read_io_bytes() -> int:
    """Bytes this process has read through read() calls (rchar), which an eager load would add."""
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs Linux /proc/self/io")
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_relion30_star_with_pixel_origins(tmp_path, make_stack):
    make_stack("Particles/m.mrcs", random_images(2, 3), apix=9.0)
    (tmp_path / "old.star").write_text(
        "data_images\nloop_\n_rlnImageName\n_rlnMagnification\n_rlnDetectorPixelSize\n_rlnOriginX\n_rlnOriginY\n"
        "1@Particles/m.mrcs 50000.0 5.0 1.0 -2.0\n2@Particles/m.mrcs 50000.0 5.0 0.5 0.0\n")
    particles = open_particles(tmp_path / "old.star")
    assert particles.pixel_size == 1.0 and particles.block == "particles"
    assert particles.table["particles"]["rlnOriginYAngst"].tolist() == ["-2.000000", "0.000000"]


def test_optics_groups_with_different_pixel_sizes(tmp_path, two_stacks):
    (tmp_path / "p.star").write_text(star_31(
        ["1@Extract/a.mrcs", "1@Extract/b.mrcs", "2@Extract/a.mrcs"], groups=[1, 2, 2],
        optics_rows=("1 opticsGroup1 1.5 300", "2 opticsGroup2 2.0 300")))
    particles = open_particles(tmp_path / "p.star")
    np.testing.assert_array_equal(particles.pixel_size, [1.5, 2.0, 2.0])
    np.testing.assert_array_equal(particles.pixel_sizes, [1.5, 2.0, 2.0])


def test_stack_paths_resolved_like_relion_and_with_datadir(tmp_path, make_stack):
    images = random_images(2, 4)
    make_stack("project/Extract/job003/m.mrcs", images)
    job = tmp_path / "project/Class2D/job010"
    job.mkdir(parents=True)
    (job / "run_data.star").write_text(star_31(["2@Extract/job003/m.mrcs"]))
    np.testing.assert_array_equal(open_particles(job / "run_data.star").read([0]), images[[1]])

    (tmp_path / "elsewhere.star").write_text(star_31(["1@/nonexistent/Extract/job003/m.mrcs"]))
    moved = open_particles(tmp_path / "elsewhere.star", datadir=tmp_path / "project/Extract/job003")
    np.testing.assert_array_equal(moved.read([0]), images[[0]])
    (tmp_path / "relative.star").write_text(star_31(["1@Extract/job003/m.mrcs"]))
    np.testing.assert_array_equal(open_particles(tmp_path / "relative.star", datadir=tmp_path / "project")
                                  .read([0]), images[[0]])


def test_write_stack_streams_chunks_into_a_valid_mrc(tmp_path):
    images = random_images(7, 5)
    count = write_stack(tmp_path / "out.mrcs", (images[i:i + 3] for i in range(0, 7, 3)), pixel_size=2.25)
    assert count == 7 and mrcfile.validate(str(tmp_path / "out.mrcs"), print_file=open(os.devnull, "w"))
    with mrcfile.open(tmp_path / "out.mrcs") as mrc:
        np.testing.assert_array_equal(mrc.data, images)
        assert mrc.voxel_size.x == pytest.approx(2.25) and mrc.is_image_stack()
        assert mrc.header.dmean == pytest.approx(images.mean(), abs=1e-5)
        assert mrc.header.rms == pytest.approx(images.std(), abs=1e-5)
    with pytest.raises(RuntimeError), write_stack_failing(tmp_path / "fail.mrcs"):
        pass
    assert list(tmp_path.glob("*fail*")) == []


def write_stack_failing(path):
    def chunks():
        yield random_images(2, 6)
        raise RuntimeError("interrupted")

    class Context:
        def __enter__(self):
            write_stack(path, chunks(), 1.0)

        def __exit__(self, *exc):
            return False

    return Context()


def bad_input(tmp_path, make_stack, case):
    """Build one broken input; returns (star_or_stack path, expected message fragment, file named)."""
    make_stack("s.mrcs", random_images(3, 7))
    names, star = ["1@s.mrcs", "2@s.mrcs"], tmp_path / "p.star"
    if case == "missing_stack":
        names[1] = "2@gone.mrcs"
        problem, named = "row 2: stack 'gone.mrcs' not found", star
    elif case == "past_end":
        names[1] = "000004@s.mrcs"
        problem, named = "data_particles row 2: image 4 is past the end of 's.mrcs' (3 images)", star
    elif case == "index_zero":
        names[0] = "000000@s.mrcs"
        problem, named = "data_particles row 1: image index 0 in '000000@s.mrcs'", star
    elif case == "bad_name":
        names[0] = "x@s.mrcs"
        problem, named = "row 1: bad _rlnImageName 'x@s.mrcs'", star
    elif case == "non_square":
        make_stack("r.mrcs", np.zeros((2, BOX, BOX + 2), np.float32))
        names[1] = "1@r.mrcs"
        problem, named = f"images are {BOX + 2}x{BOX}, not square", tmp_path / "r.mrcs"
    elif case == "mismatched_boxes":
        make_stack("t.mrcs", np.zeros((2, 2 * BOX, 2 * BOX), np.float32))
        names[1] = "1@t.mrcs"
        problem, named = "stack 't.mrcs' holds 32x32 images but 's.mrcs' holds 16x16", star
    elif case == "truncated":
        path = tmp_path / "s.mrcs"
        path.write_bytes(path.read_bytes()[:-100])
        problem = "truncated: header says 3 images of 16x16 (mode 2, 4096 bytes) but the file holds 3996"
        named = path
    elif case == "not_mrc":
        (tmp_path / "s.mrcs").write_bytes(b"short")
        problem, named = "not a readable MRC file", tmp_path / "s.mrcs"
    elif case == "undefined_group":
        star.write_text(star_31(names, groups=[1, 4]))
        return star, "data_particles row 2: optics group 4 not defined in data_optics", star
    elif case == "wrong_image_size":
        star.write_text(star_31(names, image_size=64))
        return star, "_rlnImageSize 64 but the stacks hold 16x16 images", star
    elif case == "no_image_name":
        star.write_text("data_particles\nloop_\n_rlnCoordinateX\n1.0\n")
        return star, "no data block has an _rlnImageName column", star
    elif case == "no_rows":
        star.write_text("data_optics\nloop_\n_rlnOpticsGroup\n1\ndata_particles\nloop_\n_rlnImageName\n")
        return star, "data_particles lists no particles", star
    star.write_text(star_31(names))
    return star, problem, named


BAD_CASES = ["missing_stack", "past_end", "index_zero", "bad_name", "non_square", "mismatched_boxes",
             "truncated", "not_mrc", "undefined_group", "wrong_image_size", "no_image_name", "no_rows"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_fail_at_open_with_file_and_problem(tmp_path, make_stack, case):
    star, problem, named = bad_input(tmp_path, make_stack, case)
    with pytest.raises(InputError) as caught:
        open_particles(star)
    message = str(caught.value)
    assert message.startswith(f"{named}: ") and problem in message and "\n" not in message


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")
def test_non_finite_pixels_fail_on_read(tmp_path, make_stack):
    images = random_images(3, 8)
    images[1, 4, 5] = np.nan
    path = make_stack("nan.mrcs", images)
    particles = open_particles(path)
    np.testing.assert_array_equal(particles.read([0, 2]), images[[0, 2]])
    with pytest.raises(InputError, match=f"^{path}: image 2 contains NaN or inf pixels$"):
        particles.read([2, 1])


def test_table_is_written_back_with_results(tmp_path, two_stacks):
    (tmp_path / "p.star").write_text(star_31(["1@Extract/a.mrcs", "2@Extract/b.mrcs"]))
    particles = open_particles(tmp_path / "p.star")
    write_star(tmp_path / "out.star", particles.table, pd.DataFrame({"tvaeZ01": [0.5, 0.25]}))
    back = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert back["tvaeZ01"].tolist() == [0.5, 0.25]
    assert back["rlnCoordinateX"].tolist() == [0.0, 10.0]
