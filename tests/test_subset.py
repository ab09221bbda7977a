"""tvae-em subset: particles chosen by class, by row index (text, .npy, cryoDRGN .pkl) or by latent region."""

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from tvae_em.cli import main
from tvae_em.io.stack import write_stack
from tvae_em.io.star import read_star

N_ROWS = 10
CLASS_NUMBER = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]  # an earlier classification, kept by 'embed --clusters'
CLUSTER = [2, 2, 1, 1, 3, 3, 1, 2, 1, 3]
Z1 = np.linspace(-1, 1, N_ROWS)
Z2 = Z1[::-1]
HEADER = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnVoltage #5
1 opticsGroup1 1.500000 64 300.000000
2 opticsGroup2 2.000000 64 200.000000

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
_rlnClassNumber #3
_tvaeCluster #4
_tvaeZ01 #5
_tvaeZ02 #6
_tvaeZStd01 #7
_rlnMicrographName #8
"""


@pytest.fixture
def star(tmp_path, monkeypatch):
    """A RELION 3.1 STAR embedded with 2 latent dimensions and 3 clusters (its stacks are not needed)."""
    monkeypatch.chdir(tmp_path)
    rows = [f"{i + 1:06d}@Extract/job007/stack.mrcs {1 + i // 6} {CLASS_NUMBER[i]} {CLUSTER[i]} {Z1[i]:.6f} "
            f"{Z2[i]:.6f} 0.{i}1 mic{i // 3}.mrc" for i in range(N_ROWS)]
    path = tmp_path / "embedded.star"
    path.write_text(HEADER + "\n".join(rows) + "\n")
    return path


def run(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err.splitlines()


def assert_subset(capsys, star, rows, *options):
    """'subset' with ``options`` writes exactly the input rows ``rows``, in input order, and the optics table."""
    out = star.with_name("subset.star")
    code, lines = run(["subset", str(star), "-o", str(out), *options], capsys)
    assert code == 0 and lines == [f"kept {len(rows)} of {N_ROWS} particles; wrote {out}"]
    before, after = read_star(star), read_star(out)
    assert list(after.blocks) == ["optics", "particles"]
    pd.testing.assert_frame_equal(after["optics"], before["optics"])
    pd.testing.assert_frame_equal(after["particles"], before["particles"].iloc[rows].reset_index(drop=True))
    out.unlink()


def where(condition):
    return np.flatnonzero(condition).tolist()


def test_classes_of_the_clusters_by_default_or_of_any_column(star, capsys):
    assert_subset(capsys, star, where(np.isin(CLUSTER, [1, 3])), "--classes", "1,3")
    assert_subset(capsys, star, where(np.isin(CLASS_NUMBER, [1, 3])), "--classes", "1,3", "--class-column",
                  "rlnClassNumber")
    assert_subset(capsys, star, where(np.isin(CLUSTER, [2, 3])), "--classes", "2-3", "--class-column", "_tvaeCluster")


def test_row_indices_from_text_npy_and_cryodrgn_pickles(star, capsys, tmp_path):
    (tmp_path / "ind.txt").write_text("# rows to keep\n7\n0, 3  # three\n3\n")
    assert_subset(capsys, star, [0, 3, 7], "--indices", "ind.txt")
    np.save(tmp_path / "ind.npy", np.array([9, 1]))
    assert_subset(capsys, star, [1, 9], "--indices", "ind.npy")
    with open(tmp_path / "ind.pkl", "wb") as handle:  # as cryoDRGN's utils.save_pkl writes an --ind file
        pickle.dump(np.array([5, 2], dtype=np.int64), handle)
    assert_subset(capsys, star, [2, 5], "--ind", "ind.pkl")
    with open(tmp_path / "list.pkl", "wb") as handle:
        pickle.dump([4, 6], handle, protocol=5)
    assert_subset(capsys, star, [4, 6], "--ind", "list.pkl")


def test_a_latent_region_and_criteria_together(star, capsys):
    assert_subset(capsys, star, where((Z1 >= -0.5) & (Z1 <= 0.5)), "--z-range", "1:-0.5:0.5")
    assert_subset(capsys, star, where((Z1 >= 0) & (Z2 <= 0.5)), "--z-range", "1:0:", "--z-range", "2::0.5")
    assert_subset(capsys, star, where((np.asarray(CLUSTER) == 1) & (Z1 <= 0)), "--classes", "1", "--z-range",
                  "1::0")
    (star.parent / "ind.txt").write_text("0 1 2 3 4 5\n")
    assert_subset(capsys, star, where((np.asarray(CLASS_NUMBER) == 2) & (np.arange(N_ROWS) < 6)), "--ind", "ind.txt",
                  "--classes", "2", "--class-column", "rlnClassNumber")


def bad_index_file(folder, name, write):
    path = folder / name
    write(path)
    return str(path)


@pytest.mark.parametrize(("options", "code", "message"), [
    (["--classes", "1,x"], 2, "--classes '1,x': expected class numbers like 1,3 or 2-4"),
    (["--classes", "3-1"], 2, "--classes '3-1': the range 3-1 runs backwards"),
    (["--classes", "9"], 2, "--classes: no particle of {star} is in class 9 of _tvaeCluster (its classes: 1, 2, 3)"),
    (["--classes", "1", "--class-column", "rlnGroupNumber"], 3, "{star}: data_particles has no _rlnGroupNumber column"),
    ([], 2, "choose particles with --classes, --indices or --z-range"),
    (["--z-range", "3:0:1"], 3, "{star}: data_particles has no _tvaeZ03 column (it has 2 latent dimensions; "
                                "'tvae-em embed' writes them)"),
    (["--z-range", "1:1:0"], 2, "--z-range '1:1:0': need a dimension from 1 and LOW <= HIGH"),
    (["--z-range", "1:a:2"], 2, "--z-range '1:a:2': expected DIM:LOW:HIGH, e.g. 1:-0.5:0.5 (an empty bound is open)"),
    (["--z-range", "1:5:"], 2, "no particle of {star} meets every criterion given; nothing written"),
    (["--indices", "{folder}/out_of_range.txt"], 3,
     "{folder}/out_of_range.txt: row index 10 is out of range: {star} has 10 particles (0-based indices 0 to 9)"),
    (["--indices", "{folder}/negative.npy"], 3,
     "{folder}/negative.npy: row index -1 is out of range: {star} has 10 particles (0-based indices 0 to 9)"),
    (["--indices", "{folder}/fraction.txt"], 3, "{folder}/fraction.txt: line 2: '1.5' is not a row index (0-based "
                                                "integers)"),
    (["--indices", "{folder}/fraction.npy"], 3, "{folder}/fraction.npy: not a list of row indices (a 1-D array of "
                                                "integers; found 1-D float64)"),
    (["--indices", "{folder}/code.pkl"], 3, "{folder}/code.pkl: not a pickled array of row indices (it names "
                                            "posix.getcwd, which no array of indices needs)"),
    (["--indices", "{folder}/missing.txt"], 3, "{folder}/missing.txt: file not found"),
])
def test_bad_requests_give_one_line_and_write_nothing(star, capsys, tmp_path, options, code, message):
    (tmp_path / "out_of_range.txt").write_text("0\n10\n")
    (tmp_path / "fraction.txt").write_text("0\n1.5\n")
    np.save(tmp_path / "negative.npy", np.array([0, -1]))
    np.save(tmp_path / "fraction.npy", np.array([0.0, 1.5]))
    (tmp_path / "code.pkl").write_bytes(pickle.dumps(os.getcwd))
    before = sorted(path.name for path in tmp_path.iterdir())
    options = [option.format(folder=tmp_path) for option in options]
    assert run(["subset", str(star), "-o", str(tmp_path / "out.star"), *options], capsys) == (
        code, [f"error: {message.format(star=star, folder=tmp_path)}"])
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_refuses_to_write_over_an_input(star, capsys, tmp_path):
    code, lines = run(["subset", str(star), "-o", str(star), "--classes", "1"], capsys)
    assert code == 2 and lines == [f"error: output {star} is also an input; choose another output location"]
    (tmp_path / "ind.txt").write_text("1\n")
    code, lines = run(["subset", str(star), "-o", "ind.txt", "--indices", str(tmp_path / "ind.txt")], capsys)
    assert code == 2 and lines[0].startswith("error: output ind.txt is also an input")


def test_a_relion30_star_is_written_in_relion31_form(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_stack(tmp_path / "a.mrcs", np.zeros((4, 8, 8), np.float32), 1.25)
    labels = ("rlnImageName", "rlnDetectorPixelSize", "rlnMagnification", "rlnOriginX", "rlnClassNumber")
    rows = [f"{i:06d}@a.mrcs 5.000000 10000.000000 {i}.000000 {1 + i % 2}" for i in range(1, 5)]
    star = tmp_path / "particles30.star"
    star.write_text("data_\n\nloop_\n" + "".join(f"_{label}\n" for label in labels) + "\n".join(rows) + "\n")
    code, lines = run(["subset", str(star), "-o", "odd.star", "--classes", "2"], capsys)
    assert code == 0, lines
    out = read_star(tmp_path / "odd.star")
    assert list(out.blocks) == ["optics", "particles"]
    assert out["optics"]["rlnImagePixelSize"].tolist() == ["5.000000"]
    assert out["particles"]["rlnImageName"].tolist() == ["000001@a.mrcs", "000003@a.mrcs"]
    assert out["particles"]["rlnOriginXAngst"].tolist() == ["5.000000", "15.000000"]
