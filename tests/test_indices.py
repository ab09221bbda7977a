"""--ind on train, embed and pose: only the particles of the rows an index file lists, as 'subset --ind' chooses
them (text, .npy or cryoDRGN .pkl files, read by the same reader)."""

import pickle

import numpy as np
import pandas as pd
import pytest
from test_infer import N_ROWS, write_dataset
from tiny_run import save_run

from tvae_em import checkpoint as ckpt
from tvae_em.cli import main
from tvae_em.io.stack import open_particles
from tvae_em.io.star import read_star, write_star

ROWS = [1, 4, 5, 9, 14, 15, 16, 20, 24]  # from both stacks and both optics groups of write_dataset
TINY_TRAINING = ["--rotations", "4", "--encoder-fields", "4", "--encoder-kernel", "9", "--generator-width", "16",
                 "--generator-depth", "1", "--fourier-features", "16", "--batch-size", "4", "--val-fraction",
                 "0.25", "--amp", "off"]
# the tiny model is untrained: every command rightly warns that it cannot place the particles
pytestmark = pytest.mark.filterwarnings("ignore:most poses are uncertain")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """particles.star (25 rows, two stacks, two optics groups), a tiny random run and index files of ROWS: a text
    file in shuffled order with a comment, and cryoDRGN's pickled array."""
    folder = tmp_path_factory.mktemp("indices")
    star, images = write_dataset(folder)
    (folder / "ind.txt").write_text("# chosen rows\n" + ", ".join(str(i) for i in ROWS[::-1]) + "\n")
    with open(folder / "ind.pkl", "wb") as handle:
        pickle.dump(np.array(ROWS), handle)
    return {"folder": folder, "star": star, "images": images, "run": save_run(folder / "run")}


def tvae_em(argv, capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines (progress bars and warnings aside) of ``tvae-em argv``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, [line for line in capsys.readouterr().err.splitlines()
                               if "|" not in line and not line.startswith("warning")]


def test_open_particles_keeps_the_listed_rows_in_file_order(data):
    whole = open_particles(data["star"])
    chosen = open_particles(data["star"], indices_file=data["folder"] / "ind.txt")
    assert len(chosen) == len(ROWS) and chosen.rows.tolist() == ROWS and whole.rows is None
    np.testing.assert_array_equal(chosen.read(np.arange(len(ROWS))[::-1]), data["images"][ROWS[::-1]])
    pd.testing.assert_frame_equal(chosen.table["particles"], whole.table["particles"].iloc[ROWS].reset_index(drop=True))
    pd.testing.assert_frame_equal(chosen.table["optics"], whole.table["optics"])
    np.testing.assert_array_equal(chosen.pixel_sizes, whole.pixel_sizes[ROWS])
    assert chosen.subset([0, 8]).rows.tolist() == [1, 24]  # a subset of a subset still names rows of the file


@pytest.mark.parametrize("command", ["embed", "pose"])
def test_ind_writes_the_rows_subset_chooses_with_the_same_results(data, tmp_path, capsys, command):
    folder, run = data["folder"], str(data["run"])
    subset = tmp_path / "subset.star"
    assert tvae_em(["subset", str(data["star"]), "-o", str(subset), "--ind", str(folder / "ind.pkl")], capsys)[0] == 0
    # the subset's rlnImageName cells name the stacks relative to the input's folder
    assert tvae_em([command, run, str(subset), "-o", str(tmp_path / "after_subset.star"), "--device", "cpu",
                    "--datadir", str(folder)], capsys)[0] == 0
    code, lines = tvae_em([command, run, str(data["star"]), "-o", str(tmp_path / "with_ind.star"), "--ind",
                           str(folder / "ind.pkl"), "--device", "cpu"], capsys)
    assert code == 0 and lines[-1] == f"wrote {tmp_path / 'with_ind.star'}"
    expected, written = read_star(tmp_path / "after_subset.star"), read_star(tmp_path / "with_ind.star")
    assert list(written.blocks) == ["optics", "particles"]
    pd.testing.assert_frame_equal(written["optics"], expected["optics"])
    pd.testing.assert_frame_equal(written["particles"], expected["particles"])
    assert written["particles"]["rlnImageName"].tolist() == \
        read_star(data["star"])["particles"]["rlnImageName"].iloc[ROWS].tolist()


def test_shards_divide_the_chosen_rows_and_merge_checks_the_index_file(data, tmp_path, capsys):
    folder, run = data["folder"], str(data["run"])
    ind = tmp_path / "ind.txt"
    ind.write_text((folder / "ind.txt").read_text())
    common = [run, str(data["star"]), "--ind", str(ind), "--device", "cpu", "--batch-size", "3"]
    assert tvae_em(["embed", *common, "-o", str(tmp_path / "whole.star")], capsys)[0] == 0
    for shard in ("1/3", "0/3", "2/3"):
        assert tvae_em(["embed", *common, "-o", str(tmp_path / "merged.star"), "--shard", shard], capsys)[0] == 0
    shards = [str(tmp_path / f"merged.shard{i}of3.npz") for i in range(3)]
    assert tvae_em(["merge", *shards, "-o", str(tmp_path / "merged.star")], capsys)[0] == 0
    assert (tmp_path / "merged.star").read_bytes() == (tmp_path / "whole.star").read_bytes()
    assert len(read_star(tmp_path / "merged.star")["particles"]) == len(ROWS)
    ind.write_text("0 1 2\n")
    code, lines = tvae_em(["merge", *shards, "-o", str(tmp_path / "again.star")], capsys)
    assert code == 3 and lines == [f"error: {ind}: the --ind file changed since the shards were computed; "
                                   "rerun them"]


@pytest.mark.parametrize("text, problem", [
    ("3 x 4\n", "line 1: 'x' is not a row index (0-based integers)"),
    ("3\n25\n", f"row index 25 is out of range: {{star}} has {N_ROWS} particles (0-based indices 0 to 24)"),
    ("-1\n", f"row index -1 is out of range: {{star}} has {N_ROWS} particles (0-based indices 0 to 24)"),
    ("# nothing chosen\n", "lists no row index: no particle to use"),
])
@pytest.mark.parametrize("command", ["embed", "pose", "train"])
def test_a_bad_index_file_is_one_line_naming_it(data, tmp_path, capsys, text, problem, command):
    ind = tmp_path / "bad.txt"
    ind.write_text(text)
    out = ["-o", str(tmp_path / "out")] if command == "train" else ["-o", str(tmp_path / "out.star")]
    inputs = [str(data["star"])] if command == "train" else [str(data["run"]), str(data["star"])]
    code, lines = tvae_em([command, *inputs, *out, "--ind", str(ind), "--device", "cpu"], capsys)
    assert code == 3 and lines == [f"error: {ind}: {problem.format(star=data['star'])}"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.txt"]


def test_a_missing_index_file_is_named(data, tmp_path, capsys):
    code, lines = tvae_em(["pose", str(data["run"]), str(data["star"]), "-o", str(tmp_path / "out.star"), "--ind",
                           str(tmp_path / "absent.txt"), "--device", "cpu"], capsys)
    assert code == 3 and lines == [f"error: {tmp_path / 'absent.txt'}: file not found"]


def test_train_on_chosen_rows_records_them_and_resume_keeps_them(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = read_star(data["star"])  # without its (incomplete) CTF columns
    star = str(data["folder"] / "no_ctf.star")
    write_star(star, table.replace("particles", table["particles"].drop(columns="rlnDefocusU")))
    ind = str(data["folder"] / "ind.txt")
    code, lines = tvae_em(["train", star, "-o", "run", "--ind", ind, "--epochs", "1", *TINY_TRAINING,
                           "--device", "cpu"], capsys)
    assert code == 0, lines
    split = np.load(tmp_path / "run" / ckpt.SPLIT)
    assert split["input_rows"].tolist() == ROWS and int(split["n_particles"]) == len(ROWS)
    assert len(split["val"]) == 2 and np.union1d(split["train"], split["val"]).tolist() == list(range(len(ROWS)))
    state = ckpt.read_checkpoint(tmp_path / "run" / ckpt.LAST)
    assert state["n_particles"] == len(ROWS) and state["particle_rows"].tolist() == ROWS

    # resuming without --ind trains on the run's rows; the same rows in another file are accepted
    assert tvae_em(["train", star, "--resume", "run", "--epochs", "2", "--device", "cpu"], capsys)[0] == 0
    state = ckpt.read_checkpoint(tmp_path / "run" / ckpt.LAST)
    assert state["epoch"] == 2 and state["particle_rows"].tolist() == ROWS and state["n_particles"] == len(ROWS)
    code, lines = tvae_em(["train", star, "--resume", "run", "--ind", str(data["folder"] / "ind.pkl"), "--device",
                           "cpu"], capsys)
    assert code == 0 and lines == ["run: 2 of 2 epochs are done: nothing to do (give a larger --epochs to train "
                                   "further)"]

    (tmp_path / "other.txt").write_text("0 1 2 3 4 5 6 7\n")
    code, lines = tvae_em(["train", star, "--resume", "run", "--epochs", "3", "--ind", "other.txt", "--lr", "0.1",
                           "--device", "cpu"], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: cannot resume run with --lr 0.1 (the run's lr: 0.002); --ind other.txt (the "
                               f"run's particles: {len(ROWS)} rows chosen by --ind): only --epochs")
    assert ckpt.read_checkpoint(tmp_path / "run" / ckpt.LAST)["epoch"] == 2
