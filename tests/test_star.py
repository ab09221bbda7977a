# ruff: noqa: E501  (STAR rows below are realistic RELION lines, longer than the code limit)
import warnings

import numpy as np
import pandas as pd
import pytest
import starfile

from tvae_em.errors import InputError
from tvae_em.io.particles import ParticleTable
from tvae_em.io.star import new_relion31_star, numeric_column, particles_block, read_star, write_star

OPTICS_31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
_rlnOddZernike #10
_rlnEvenZernike #11
opticsGroup1 1 0.885000 300.000000 2.700000 0.100000 1.770000 64 2 [0.470415004546,0.416253693925] [46.1065,61.3089,-58.85]
opticsGroup2 2 0.885000 200.000000 2.700000 0.100000 3.540000 64 2 [0.1,0.2] [1,2,3]
"""

PARTICLES_31 = """
# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnImageName #3
_rlnMicrographName #4
_rlnDefocusU #5
_rlnAnglePsi #6
_rlnOriginXAngst #7
_rlnOriginYAngst #8
_rlnOpticsGroup #9
_rlnLogLikeliContribution #10
_rlnClassNumber #11
 3136.000000  2296.000000 000001@Extract/job007/mic1.mrcs MotionCorr/job002/mic1.mrc 30876.811323 -69.45995 1.234567 -0.885000 1 3.763459e+05 1
 1234.500000   100.250000 000012@Extract/job007/mic1.mrcs MotionCorr/job002/mic1.mrc 28722.607179 12.3 0.000000 2.655000 2 -1.0e-7 3
   17.000000    18.000000 3@Extract/job007/mic2.mrcs MotionCorr/job002/mic2.mrc 25000.000000 179.999999 -7.080000 0.000000 1 0.123456789012345678 2
"""

STAR_30 = """
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
_rlnGroupNumber #12
000001@Particles/mic1.mrcs mic1.mrc 300.000000 2.700000 0.100000 100000.000000 14.000000 10000.5 -3.30401 1.5 12.0 1
000002@Particles/mic1.mrcs mic1.mrc 300.000000 2.700000 0.100000 100000.000000 14.000000 10001.5 2.0 -1.0 13.0 1
000001@Particles/mic2.mrcs mic2.mrc 200.000000 2.700000 0.100000 100000.000000 14.000000 10002.5 0.0 0.0 14.0 2
000003@Particles/mic1.mrcs mic1.mrc 300.000000 2.700000 0.100000 100000.000000 14.000000 10003.5 0.5 0.25 15.0 1
"""


def starfile_blocks(path):
    return starfile.read(path, always_dict=True)


def write_text(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_columns_identical(original: pd.DataFrame, written: pd.DataFrame, skip=()):
    for column in original.columns:
        if column not in skip:
            pd.testing.assert_series_equal(original[column], written[column], check_exact=True)


@pytest.mark.parametrize("layout", ["optics_first", "particles_first", "no_version_line"])
def test_relion31_written_back_with_new_columns_keeps_every_value(tmp_path, layout):
    text = {"optics_first": OPTICS_31 + PARTICLES_31, "particles_first": PARTICLES_31 + OPTICS_31,
            "no_version_line": (OPTICS_31 + PARTICLES_31).replace("# version 30001\n", "")}[layout]
    source = write_text(tmp_path, "in.star", text)
    star = read_star(source)
    expected_order = ["particles", "optics"] if layout == "particles_first" else ["optics", "particles"]
    assert list(star.blocks) == expected_order
    new = pd.DataFrame({"tvaeZ01": np.float32([0.1, -2.5, 3e-8]), "_tvaeCluster": [1, 2, 1]})
    write_star(tmp_path / "out.star", star, new)

    before, after = starfile_blocks(source), starfile_blocks(tmp_path / "out.star")
    assert list(after) == list(before)
    for name in before:
        assert_columns_identical(before[name], after[name])
    assert list(after["particles"].columns[-2:]) == ["tvaeZ01", "tvaeCluster"]
    np.testing.assert_array_equal(after["particles"]["tvaeZ01"].to_numpy(np.float32), new["tvaeZ01"])
    np.testing.assert_array_equal(after["particles"]["tvaeCluster"], [1, 2, 1])
    assert after["optics"]["rlnOddZernike"].iloc[0] == "[0.470415004546,0.416253693925]"
    # the text of the input values is kept character for character
    written = (tmp_path / "out.star").read_text()
    for text in ("3.763459e+05", "0.123456789012345678", "3@Extract/job007/mic2.mrcs", " -1.0e-7 "):
        assert text in written


def test_replacing_an_existing_column_keeps_its_position(tmp_path):
    star = read_star(write_text(tmp_path, "in.star", OPTICS_31 + PARTICLES_31))
    write_star(tmp_path / "out.star", star, pd.DataFrame({"rlnAnglePsi": [1.5, -2.0, 90.0]}))
    after = starfile_blocks(tmp_path / "out.star")["particles"]
    assert list(after.columns) == list(star["particles"].columns)
    np.testing.assert_array_equal(after["rlnAnglePsi"], [1.5, -2.0, 90.0])


def test_relion30_becomes_an_optics_table_like_relion(tmp_path):
    source = write_text(tmp_path, "in30.star", STAR_30)
    table = ParticleTable.from_star(read_star(source), box=64, header_pixel_size=9.9)
    star = table.star
    assert list(star.blocks) == ["optics", "particles"]
    optics = star["optics"]
    assert list(optics.columns) == ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnAmplitudeContrast",
                                    "rlnSphericalAberration", "rlnVoltage", "rlnImagePixelSize", "rlnImageSize",
                                    "rlnImageDimensionality"]
    assert optics.to_dict("list") == {
        "rlnOpticsGroup": ["1", "2"], "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
        "rlnAmplitudeContrast": ["0.100000"] * 2, "rlnSphericalAberration": ["2.700000"] * 2,
        "rlnVoltage": ["300.000000", "200.000000"], "rlnImagePixelSize": ["1.400000"] * 2,
        "rlnImageSize": ["64"] * 2, "rlnImageDimensionality": ["2"] * 2}
    particles = star["particles"]
    assert list(particles.columns) == ["rlnImageName", "rlnMicrographName", "rlnDefocusU", "rlnOriginXAngst",
                                       "rlnOriginYAngst", "rlnAnglePsi", "rlnGroupNumber", "rlnOpticsGroup"]
    assert particles["rlnOpticsGroup"].tolist() == ["1", "1", "2", "1"]
    np.testing.assert_allclose(numeric_column(star, "particles", "rlnOriginXAngst"),
                               np.array([-3.30401, 2.0, 0.0, 0.5]) * 1.4, atol=1e-6)
    np.testing.assert_allclose(table.pixel_sizes, 1.4)

    write_star(tmp_path / "out.star", star, pd.DataFrame({"tvaeZ01": np.arange(4.0)}))
    before, after = starfile_blocks(source)[""], starfile_blocks(tmp_path / "out.star")
    assert list(after) == ["optics", "particles"]
    assert_columns_identical(before, after["particles"],
                             skip=("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                                   "rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX", "rlnOriginY"))


def test_relion30_pixel_size_fallbacks(tmp_path):
    bare = STAR_30.replace("_rlnMagnification #6\n_rlnDetectorPixelSize #7\n", "").replace(
        " 100000.000000 14.000000", "")
    table = ParticleTable.from_star(read_star(write_text(tmp_path, "bare.star", bare)), 64, header_pixel_size=2.5)
    np.testing.assert_allclose(table.pixel_sizes, 2.5)
    np.testing.assert_allclose(numeric_column(table.star, "particles", "rlnOriginYAngst")[0], 1.5 * 2.5)
    with pytest.warns(UserWarning, match="no pixel size"):
        table = ParticleTable.from_star(read_star(tmp_path / "bare.star"), 64, header_pixel_size=0.0)
    np.testing.assert_allclose(table.pixel_sizes, 1.0)
    with_pixel_size = bare.replace("_rlnGroupNumber #12", "_rlnGroupNumber #12\n_rlnPixelSize #13").replace(
        " 1\n", " 1 1.25\n").replace(" 2\n", " 2 1.25\n")
    star = ParticleTable.from_star(read_star(write_text(tmp_path, "px.star", with_pixel_size)), 64,
                                   header_pixel_size=9.0).star
    assert star["optics"]["rlnImagePixelSize"].tolist() == ["1.25", "1.25"]
    assert "rlnPixelSize" not in star["particles"]


def test_fresh_relion31_star_reads_back_with_starfile(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [1.5], "rlnImageSize": [64], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({"rlnImageName": ["000001@my stack.mrcs", "000002@my stack.mrcs"],
                              "rlnOpticsGroup": [1, 1], "rlnAnglePsi": [0.1, -179.5], "_tvaeTrueClass": [3, 4]})
    write_star(tmp_path / "new.star", new_relion31_star(optics, particles))
    back = starfile_blocks(tmp_path / "new.star")
    assert back["particles"]["rlnImageName"].tolist() == particles["rlnImageName"].tolist()
    np.testing.assert_array_equal(back["particles"]["rlnAnglePsi"], [0.1, -179.5])
    assert back["particles"]["tvaeTrueClass"].tolist() == [3, 4]
    assert read_star(tmp_path / "new.star")["particles"]["rlnImageName"][0] == "000001@my stack.mrcs"
    assert back["optics"]["rlnImagePixelSize"][0] == 1.5


def test_comments_blank_lines_and_pair_blocks(tmp_path):
    text = ("# made by hand\ndata_general\n\n_rlnNrClasses 5\n_rlnName 'a b'\n\ndata_particles\nloop_\n"
            "_rlnImageName\n_rlnClassNumber\n\n1@a.mrcs 1\n# a comment row\n\n2@a.mrcs 2\n")
    star = read_star(write_text(tmp_path, "pairs.star", text))
    assert not star.blocks["general"].loop
    assert star["general"].iloc[0].to_dict() == {"rlnNrClasses": "5", "rlnName": "a b"}
    assert star["particles"]["rlnImageName"].tolist() == ["1@a.mrcs", "2@a.mrcs"]
    assert particles_block(star) == "particles"
    write_star(tmp_path / "out.star", star)
    back = starfile_blocks(tmp_path / "out.star")
    assert back["general"] == {"rlnNrClasses": 5, "rlnName": "a b"}
    assert back["particles"]["rlnClassNumber"].tolist() == [1, 2]


def test_large_loop_reads_fast_and_exactly(tmp_path):
    n = 20000
    rows = "\n".join(f"{i + 1:06d}@s.mrcs {i * 0.001:.6f} {i % 7}" for i in range(n))
    text = f"data_particles\nloop_\n_rlnImageName\n_rlnA\n_rlnB\n{rows}\n"
    star = read_star(write_text(tmp_path, "big.star", text))
    assert len(star["particles"]) == n and star["particles"]["rlnA"].iloc[-1] == f"{(n - 1) * 0.001:.6f}"


BAD_STARS = {
    "empty": (b"", "empty STAR file"),
    "whitespace": (b"\n  \n", "empty STAR file"),
    "binary": (bytes(range(256)) * 4, "binary data"),
    "not_utf8": (b"data_x\nloop_\n_rlnA\n\xff\xfe\n", "not UTF-8"),
    "no_block": (b"hello world\n", "before the first data_ block"),
    "too_many_values": (b"data_p\nloop_\n_rlnA\n_rlnB\n1 2\n3 4\n5 6 7\n", "line 7: 3 values in a data_p row"),
    "first_row_too_long": (b"data_p\nloop_\n_rlnA\n_rlnB\n1 2 3\n4 5 6\n", "data_p row 1: 3 values for 2 labels"),
    "too_few_values": (b"data_p\nloop_\n_rlnA\n_rlnB\n1 2\n3\n", "data_p row 2: fewer values for 2 labels"),
    "ragged_quoted": (b"data_p\nloop_\n_rlnA\n_rlnB\n'a b' 2\n'c d'\n", "data_p row 2: 1 values for 2 labels"),
    "duplicate_label": (b"data_p\nloop_\n_rlnA\n_rlnA\n1 2\n", "label _rlnA declared twice"),
    "duplicate_block": (b"data_p\n_rlnA 1\ndata_p\n_rlnA 2\n", "data_p appears twice"),
    "bad_pair": (b"data_p\n_rlnA 1 2\n", "expected '_label value'"),
}


@pytest.mark.parametrize("case", sorted(BAD_STARS))
def test_malformed_star_files_raise_one_line_input_errors(tmp_path, case):
    content, problem = BAD_STARS[case]
    path = tmp_path / f"{case}.star"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        read_star(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_semantic_errors_name_file_and_problem(tmp_path):
    no_names = read_star(write_text(tmp_path, "nonames.star", "data_particles\nloop_\n_rlnA\n1\n"))
    with pytest.raises(InputError, match="no data block has an _rlnImageName column"):
        particles_block(no_names)
    undefined = (OPTICS_31 + PARTICLES_31).replace("1 3.763459e+05 1", "7 3.763459e+05 1")
    with pytest.raises(InputError, match=r"undefined.star: data_particles row 1: optics group 7 not defined"):
        ParticleTable.from_star(read_star(write_text(tmp_path, "undefined.star", undefined)), 64, None)
    with pytest.raises(InputError, match=r"_rlnImageSize 64 but the stacks hold 32x32"):
        ParticleTable.from_star(read_star(write_text(tmp_path, "ok.star", OPTICS_31 + PARTICLES_31)), 32, None)
    for name, pixel_size in [("zero", "0.000000"), ("nan", "nan"), ("inf", "inf"), ("minf", "-inf")]:
        bad_pixel = (OPTICS_31 + PARTICLES_31).replace("0.100000 3.540000 64", f"0.100000 {pixel_size} 64")
        with pytest.raises(InputError, match=rf"{name}.star: data_optics row 2: _rlnImagePixelSize "
                                             rf"'{pixel_size}' is not a positive finite number"):
            ParticleTable.from_star(read_star(write_text(tmp_path, f"{name}.star", bad_pixel)), 64, None)
    garbage = (OPTICS_31 + PARTICLES_31).replace("30876.811323", "thirty")
    with pytest.raises(InputError, match=r"data_particles row 1: _rlnDefocusU 'thirty' is not a number"):
        numeric_column(read_star(write_text(tmp_path, "garbage.star", garbage)), "particles", "rlnDefocusU")
    with pytest.raises(InputError, match="file not found"):
        read_star(tmp_path / "missing.star")


def test_warning_free_on_a_clean_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParticleTable.from_star(read_star(write_text(tmp_path, "clean.star", OPTICS_31 + PARTICLES_31)), 64, None)
