import numpy as np
import pandas as pd
import pytest
from console_lines import message_lines

from tvae_em.errors import InputError, UsageError
from tvae_em.io.picks import PickedBoxes, box_corners, match_micrographs, read_picks
from tvae_em.io.stack import open_particles
from tvae_em.io.star import numeric_column, read_star

TOPAZ_TABLE = ("image_name\tx_coord\ty_coord\tscore\n"
               "mic_001\t50\t30\t2.5\n"
               "mic_001\t10\t40\t-1.25\n"
               "mic_002\t70\t60\t0.75\n"
               "mic_002\t95\t20\t3.0\n")

TOPAZ_STAR = ("data_images\n\nloop_\n_rlnMicrographName\n_rlnCoordinateX\n_rlnCoordinateY\n"
              "_rlnAutopickFigureOfMerit\n"
              "MotionCorr/mic_001.mrc 50 30 2.5\n"
              "MotionCorr/mic_002.mrc 70 60 0.75\n")


def test_topaz_table_with_threshold(tmp_path):
    path = tmp_path / "picks.txt"
    path.write_text(TOPAZ_TABLE)
    table, x, y = read_picks(path)
    assert list(table.columns) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                                   "rlnAutopickFigureOfMerit"]
    np.testing.assert_array_equal(x, [50, 10, 70, 95])
    np.testing.assert_array_equal(y, [30, 40, 60, 20])
    table, x, y = read_picks(path, threshold=0.75)
    assert table["rlnAutopickFigureOfMerit"].tolist() == ["2.5", "0.75", "3.0"]
    np.testing.assert_array_equal(x, [50, 70, 95])


def test_topaz_star_output(tmp_path):
    path = tmp_path / "picks.star"
    path.write_text(TOPAZ_STAR)
    table, x, y = read_picks(path, threshold=1.0)
    assert table["rlnMicrographName"].tolist() == ["MotionCorr/mic_001.mrc"]
    assert (x.tolist(), y.tolist()) == ([50.0], [30.0])


def test_picks_errors(tmp_path):
    no_score = tmp_path / "noscore.txt"
    no_score.write_text("image_name x_coord y_coord\nm 1 2\n")
    with pytest.raises(UsageError, match="no score column"):
        read_picks(no_score, threshold=0.0)
    missing = tmp_path / "missing.txt"
    missing.write_text("image_name x\nm 1\n")
    with pytest.raises(InputError, match=r"missing.txt: Topaz picks table lacks column\(s\) x_coord, y_"):
        read_picks(missing)
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("image_name x_coord y_coord\nm one 2\n")
    with pytest.raises(InputError, match=r"garbage.txt: data_picks row 1: _rlnCoordinateX 'one' is not a"):
        read_picks(garbage)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="empty picks file"):
        read_picks(tmp_path / "empty.txt")


def test_micrographs_matched_by_name_or_stem(tmp_path, make_stack):
    for name in ("mic_001.mrc", "mic_002.mrc"):
        make_stack(f"mics/{name}", np.zeros((8, 8), np.float32))
    table = read_picks_text(tmp_path, TOPAZ_STAR)[0]
    paths, ids = match_micrographs(tmp_path / "p", table["rlnMicrographName"], str(tmp_path / "mics/*.mrc"))
    assert [p.name for p in paths] == ["mic_001.mrc", "mic_002.mrc"] and ids.tolist() == [0, 1]
    paths, ids = match_micrographs("p", read_picks_text(tmp_path, TOPAZ_TABLE)[0]["rlnMicrographName"],
                                   str(tmp_path / "mics/*.mrc"))
    assert ids.tolist() == [0, 0, 1, 1]
    with pytest.raises(InputError, match=r"row 2: micrograph 'mic_003' not among the 2 files matching"):
        match_micrographs("p", pd.Series(["mic_001", "mic_003"]), str(tmp_path / "mics/*.mrc"))
    with pytest.raises(UsageError, match="no micrograph file matches"):
        match_micrographs("p", pd.Series(["mic_001"]), str(tmp_path / "nothing/*.mrc"))


def read_picks_text(tmp_path, text):
    path = tmp_path / "picks.in"
    path.write_text(text)
    return read_picks(path)


def test_boxes_are_centred_on_x_column_y_row_and_off_micrograph_picks_are_skipped(tmp_path, make_stack):
    micrograph = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)  # value = row * 120 + col
    path = make_stack("mic.mrc", micrograph, apix=1.3)
    x = np.array([50.0, 10.4, 7.0, 115.0, 60.5, 6.0])  # 115: box to col 121 > 120
    y = np.array([30.0, 40.0, 5.0, 50.0, 94.6, 6.0])  # 5: box from row -1; 94.6: to row 101
    boxes = PickedBoxes([path], np.zeros(6, dtype=np.int64), x, y, box=12)
    assert boxes.kept.tolist() == [True, True, False, False, False, True]
    assert len(boxes) == 3 and boxes.micrograph_pixel_size == pytest.approx(1.3)
    images = boxes.read([0, 1, 2])
    assert images[0, 6, 6] == 30 * 120 + 50  # the box centre pixel is (row y, col x)
    np.testing.assert_array_equal(images[0], micrograph[24:36, 44:56])
    np.testing.assert_array_equal(images[1], micrograph[34:46, 4:16])  # 10.4 rounds to 10
    np.testing.assert_array_equal(images[2], micrograph[0:12, 0:12])
    rows, cols = box_corners([60.5], [93.5], 12)
    assert (rows[0], cols[0]) == (88, 55)  # halves round up, as in RELION


def test_movies_are_not_micrographs(tmp_path, make_stack):
    path = make_stack("movie.mrcs", np.zeros((3, 16, 16), np.float32))
    with pytest.raises(InputError, match="3 sections; expected one"):
        PickedBoxes([path], np.zeros(1, dtype=np.int64), [8.0], [8.0], 4)


# --- picks made on binned micrographs, and picks whose box crosses the edge (issue 14) ------------------------

# particles at these full-size (x, y) positions; Topaz picked them on the micrographs binned by 4
PARTICLES = {"m1": [(60, 40), (100, 72)], "m2": [(32, 48)]}
BIN = 4
EDGE_PICKS = {"m1": (1, 10), "m2": (31, 23)}  # binned; times 4: (4, 40) and (124, 92), boxes off 96 x 128 px


def micrographs_with_particles(make_stack) -> dict:
    """96 x 128 px micrographs of weak noise with a Gaussian blob (sigma 2 px) on every particle of PARTICLES."""
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:96, 0:128]
    images = {}
    for name, positions in PARTICLES.items():
        image = 0.01 * rng.normal(size=(96, 128))
        for x, y in positions:
            image += np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / 8.0)
        images[name] = image.astype(np.float32)
        make_stack(f"mics/{name}.mrc", images[name], apix=1.1)
    return images


def topaz_picks(star: bool) -> str:
    """The binned picks as Topaz writes them: its tab-separated table (image names without extension), or the
    STAR file of 'topaz convert' (image names with it)."""
    picks = [(name, x / BIN, y / BIN, 5.0) for name, positions in PARTICLES.items() for x, y in positions]
    picks += [(name, x, y, 1.0) for name, (x, y) in EDGE_PICKS.items()]
    if star:
        return ("data_images\n\nloop_\n_rlnMicrographName\n_rlnCoordinateX\n_rlnCoordinateY\n"
                "_rlnAutopickFigureOfMerit\n" + "".join(f"{n}.mrc {x:g} {y:g} {s}\n" for n, x, y, s in picks))
    return "image_name\tx_coord\ty_coord\tscore\n" + "".join(f"{n}\t{x:g}\t{y:g}\t{s}\n" for n, x, y, s in picks)


def preprocess_cli(argv, capsys) -> tuple[int, list[str]]:
    from tvae_em.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, message_lines(capsys.readouterr().err)


@pytest.mark.parametrize("star", [False, True], ids=["topaz table", "topaz star"])
def test_pick_scale_puts_binned_picks_on_their_particles(tmp_path, make_stack, capsys, monkeypatch, star):
    monkeypatch.chdir(tmp_path)
    images = micrographs_with_particles(make_stack)
    (tmp_path / "picks.in").write_text(topaz_picks(star))
    code, lines = preprocess_cli(["preprocess", "--picks", "picks.in", "--micrographs", "mics/*.mrc", "--box", "16",
                                  "--pick-scale", str(BIN), "--normalize", "none", "-o", "prep"], capsys)
    assert code == 0 and lines == ["note: 2 of 5 picks left out: their 16 px box crosses the edge of the "
                                   "micrograph (on m1.mrc, m2.mrc)", "wrote prep/particles.star"]
    out = read_star(tmp_path / "prep" / "particles.star")
    expected = [(name, x, y) for name, positions in PARTICLES.items() for x, y in positions]
    assert numeric_column(out, "particles", "rlnCoordinateX").tolist() == [x for _, x, _ in expected]
    assert numeric_column(out, "particles", "rlnCoordinateY").tolist() == [y for _, _, y in expected]
    extracted = open_particles(tmp_path / "prep" / "particles.star").read(np.arange(3))
    for image, (name, x, y) in zip(extracted, expected, strict=True):
        np.testing.assert_array_equal(image, images[name][y - 8:y + 8, x - 8:x + 8])
        assert np.unravel_index(image.argmax(), image.shape) == (8, 8)  # the particle in the box centre


def test_without_the_scale_binned_picks_miss_their_particles(tmp_path, make_stack, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    micrographs_with_particles(make_stack)
    (tmp_path / "picks.txt").write_text(topaz_picks(star=False))
    code, lines = preprocess_cli(["preprocess", "--picks", "picks.txt", "--micrographs", "mics/*.mrc", "--box", "16",
                                  "--normalize", "none", "-o", "prep"], capsys)
    assert code == 0 and lines == ["note: 1 of 5 picks left out: their 16 px box crosses the edge of the "
                                   "micrograph (on m1.mrc)", "wrote prep/particles.star"]
    extracted = open_particles(tmp_path / "prep" / "particles.star").read(np.arange(4))
    assert extracted.max(axis=(1, 2)).max() < 0.5  # no particle in any box


def test_edge_note_counts_micrographs_beyond_three(tmp_path, make_stack):
    paths = [make_stack(f"m{i}.mrc", np.zeros((32, 32), np.float32)) for i in range(5)]
    mic_id = np.array([0, 0, 1, 2, 3, 4])
    x, y = np.array([16.0, 2.0, 30.0, 16.0, 1.0, 16.0]), np.array([16.0, 16.0, 16.0, 31.0, 1.0, 16.0])
    boxes = PickedBoxes(paths, mic_id, x, y, box=8)
    assert boxes.edge_note() == ("note: 4 of 6 picks left out: their 8 px box crosses the edge of the micrograph "
                                 "(on 4 of 5 micrographs)")
    assert PickedBoxes(paths, np.array([0]), [16.0], [16.0], box=8).edge_note() is None


@pytest.mark.parametrize("scale", [0.0, -2.0, float("nan"), float("inf")])
def test_pick_scale_must_be_a_positive_finite_number(tmp_path, scale):
    path = tmp_path / "picks.txt"
    path.write_text(TOPAZ_TABLE)
    with pytest.raises(UsageError, match=rf"^--pick-scale {scale}: the coordinate scale must be a positive, finite"):
        read_picks(path, scale=scale)
    table, x, y = read_picks(path, threshold=0.0, scale=0.5)
    assert table["rlnCoordinateX"].tolist() == ["25.0", "35.0", "47.5"] and y.tolist() == [15.0, 30.0, 10.0]


@pytest.mark.parametrize("option", [["--pick-scale", "4"], ["--threshold", "0.5"], ["--box", "16"],
                                    ["--micrographs", "mics/*.mrc"]])
def test_pick_options_without_picks_are_refused_not_ignored(tmp_path, make_stack, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    make_stack("particles.mrcs", np.zeros((2, 16, 16), np.float32))
    code, lines = preprocess_cli(["preprocess", "particles.mrcs", "-o", "prep", *option], capsys)
    assert code == 2 and lines == [f"error: {option[0]} only apply to Topaz picks (--picks), not to a particle file"]
    assert not (tmp_path / "prep").exists()
