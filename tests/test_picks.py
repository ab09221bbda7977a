import numpy as np
import pandas as pd
import pytest

from tvae_em.errors import InputError, UsageError
from tvae_em.io.picks import PickedBoxes, box_corners, match_micrographs, read_picks

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
