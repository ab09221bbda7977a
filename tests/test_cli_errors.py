"""Bad inputs through the real entry point (``tvae_em.cli.main``, as the ``tvae-em`` script runs it).

Every case must end with exactly one stderr line 'error: <file>: <problem>' (progress bars aside), no
traceback, the documented exit code, and the folder exactly as it was: inputs unchanged byte for byte and
no output, complete or partial, left behind.
"""

import fcntl
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from console_lines import message_lines

from tvae_em import checkpoint, infer, render
from tvae_em.cli import main
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.errors import EXIT_DATA, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_USAGE
from tvae_em.io.stack import ArrayParticles, write_stack
from tvae_em.io.star import read_star
from tvae_em.train import train

REPO = Path(__file__).resolve().parents[1]
BOX, N_IMAGES = 16, 6
TINY_MODEL = dict(image_size=BOX, rotations=4, z_dim=2, encoder_fields=4, encoder_kernel=5,
                  generator_width=16, generator_depth=1, fourier_features=16, likelihood="gaussian")
TINY_TRAIN_OPTIONS = ["--rotations", "4", "--encoder-fields", "4", "--encoder-kernel", "5",
                      "--generator-width", "16", "--generator-depth", "1", "--fourier-features", "16",
                      "--batch-size", "8"]
OPTICS = ("data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnImagePixelSize\n"
          "1 opticsGroup1 1.5\n")
PARTICLE_LABELS = ("rlnImageName", "rlnOpticsGroup", "rlnMicrographName")


def star_text(rows=None, labels=PARTICLE_LABELS) -> str:
    """A RELION 3.1 particle STAR; default rows: every image of a.mrcs, optics group 1."""
    if rows is None:
        rows = [f"{i:06d}@a.mrcs 1 mic1.mrc" for i in range(1, N_IMAGES + 1)]
    header = "".join(f"_{label}\n" for label in labels)
    return f"# version 30001\n\n{OPTICS}\n# version 30001\n\ndata_particles\n\nloop_\n{header}" + \
        "".join(f"{row}\n" for row in rows)


def write(path, content) -> Path:
    path = Path(path)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def new_mrc(path, images) -> Path:
    """An MRC written by mrcfile (not by the code under test), e.g. with NaN pixels or odd shapes."""
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's header statistics of NaN/inf data
        mrc.set_data(np.asarray(images, np.float32))
        mrc.set_image_stack()
    return Path(path)


def snapshot(folder: Path) -> dict:
    """SHA-256 of every file under ``folder``: any created, changed or deleted file shows up."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_main(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real run folder: one epoch of a tiny model trained by tvae_em.train."""
    torch.set_num_threads(1)
    images = np.random.default_rng(1).normal(size=(16, BOX, BOX)).astype(np.float32)
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    config = TrainConfig(batch_size=8, epochs=1, val_fraction=0.25, num_workers=0, progress=False,
                         device="cpu")
    train(ModelConfig(**TINY_MODEL), config, ArrayParticles(images), run_dir)
    return run_dir


@pytest.fixture
def project(tmp_path, monkeypatch, trained_run) -> Path:
    """A good project in the working folder: a.mrcs (6 images), particles.star, run/ (trained)."""
    monkeypatch.chdir(tmp_path)
    write_stack(tmp_path / "a.mrcs", np.random.default_rng(0).normal(size=(N_IMAGES, BOX, BOX)), 1.5)
    write(tmp_path / "particles.star", star_text())
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path


# --- the cases: each prepares one bad input in the project folder and returns the command line ----------

CASES = []


def case(code, *fragments):
    """Register a case: expected exit code and the text the error line must contain (file and problem)."""

    def register(setup):
        CASES.append(pytest.param(setup, code, fragments, id=setup.__name__))
        return setup

    return register


def preprocess(star="bad.star"):
    return ["preprocess", star, "-o", "out"]


@case(EXIT_DATA, "bad.star: data_particles row 3: fewer values for 3 labels")
def star_row_missing_a_value(folder):
    write("bad.star", star_text().replace("000003@a.mrcs 1 mic1.mrc", "000003@a.mrcs 1"))
    return preprocess()


@case(EXIT_DATA, "bad.star: line 21: 4 values in a data_particles row, earlier rows have 3")
def star_row_with_an_extra_value(folder):
    write("bad.star", star_text().replace("000003@a.mrcs 1 mic1.mrc", "000003@a.mrcs 1 mic1.mrc 7"))
    return preprocess()


@case(EXIT_DATA, "bad.star: line 20: unterminated or misplaced quote")
def star_unterminated_quote(folder):
    write("bad.star", star_text().replace("000002@a.mrcs 1 mic1.mrc", '000002@a.mrcs 1 "mic 1.mrc'))
    return preprocess()


@case(EXIT_DATA, "bad.star: empty STAR file")
def star_empty(folder):
    write("bad.star", b"")
    return preprocess()


@case(EXIT_DATA, "bad.star: binary data, not a STAR text file")
def star_binary_garbage(folder):
    write("bad.star", bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)))
    return preprocess()


@case(EXIT_DATA, "bad.star: line 1: 'PK", "before the first data_ block")
def star_is_some_other_text(folder):
    write("bad.star", "PK\u2028 \x85 not a STAR file\n")  # Unicode line breaks must not split the message
    return preprocess()


@case(EXIT_DATA, "bad.star: no data block has an _rlnImageName column")
def star_without_image_names(folder):
    write("bad.star", star_text(["1 mic1.mrc"], labels=("rlnOpticsGroup", "rlnMicrographName")))
    return preprocess()


@case(EXIT_DATA, "bad.star: data_particles row 2: optics group 7 not defined in data_optics")
def optics_group_not_defined(folder):
    write("bad.star", star_text().replace("000002@a.mrcs 1", "000002@a.mrcs 7"))
    return preprocess()


@case(EXIT_DATA, "bad.star: data_particles row 4: image index 0 in '000000@a.mrcs'")
def image_index_zero(folder):
    write("bad.star", star_text().replace("000004@a.mrcs", "000000@a.mrcs"))
    return preprocess()


@case(EXIT_DATA, "bad.star: data_particles row 6: image 7 is past the end of 'a.mrcs' (6 images)")
def image_past_the_end(folder):
    write("bad.star", star_text().replace("000006@a.mrcs", "000007@a.mrcs"))
    return preprocess()


@case(EXIT_DATA, "bad.star: row 2: stack 'gone.mrcs' not found")
def stack_missing(folder):
    write("bad.star", star_text().replace("000002@a.mrcs", "000001@gone.mrcs"))
    return preprocess()


@case(EXIT_DATA, "missing.star: file not found")
def star_missing(folder):
    return preprocess("missing.star")


@case(EXIT_DATA, "short.mrcs: truncated: header says 6 images of 16x16")
def mrc_truncated(folder):
    write("short.mrcs", Path("a.mrcs").read_bytes()[:1024 + 3 * BOX * BOX * 4 + 100])
    write("bad.star", star_text().replace("@a.mrcs", "@short.mrcs"))
    return preprocess()


@case(EXIT_DATA, "short.mrcs: not a readable MRC file")
def mrc_shorter_than_its_header(folder):
    write("short.mrcs", Path("a.mrcs").read_bytes()[:700])
    write("bad.star", star_text().replace("@a.mrcs", "@short.mrcs"))
    return preprocess()


def lying_copy(**header_values):
    shutil.copy("a.mrcs", "liar.mrcs")
    with mrcfile.open("liar.mrcs", "r+", permissive=True) as mrc:
        for name, value in header_values.items():
            setattr(mrc.header, name, value)
    write("bad.star", star_text().replace("@a.mrcs", "@liar.mrcs"))
    return preprocess()


@case(EXIT_DATA, "liar.mrcs: truncated: header says 600 images of 16x16")
def mrc_header_claims_more_images(folder):
    return lying_copy(nz=600)


@case(EXIT_DATA, "liar.mrcs: truncated: header says 1048576 images of 1048576x1048576")
def mrc_header_size_overflows_64_bits(folder):
    return lying_copy(nx=2 ** 20, ny=2 ** 20, nz=2 ** 20)  # 2**60 float32 values: 2**62 bytes


@case(EXIT_DATA, "liar.mrcs: unsupported MRC mode 9")
def mrc_header_unknown_mode(folder):
    return lying_copy(mode=9)


@case(EXIT_DATA, "nan.mrcs: image 3 contains NaN or inf pixels")
def nan_pixels(folder):
    images = np.ones((N_IMAGES, BOX, BOX), np.float32)
    images[2, 5, 5] = np.nan
    new_mrc("nan.mrcs", images)
    write("bad.star", star_text().replace("@a.mrcs", "@nan.mrcs"))
    return preprocess()


@case(EXIT_DATA, "inf.mrcs: image 5 contains NaN or inf pixels")
def infinite_pixels(folder):
    images = np.ones((N_IMAGES, BOX, BOX), np.float32)
    images[4, 0, 0] = -np.inf
    new_mrc("inf.mrcs", images)
    write("bad.star", star_text().replace("@a.mrcs", "@inf.mrcs"))
    return preprocess()


@case(EXIT_DATA, "rect.mrcs: images are 12x16, not square")
def non_square_images(folder):
    new_mrc("rect.mrcs", np.zeros((N_IMAGES, BOX, 12)))
    write("bad.star", star_text().replace("@a.mrcs", "@rect.mrcs"))
    return preprocess()


@case(EXIT_DATA, "bad.star: stack 'b.mrcs' holds 20x20 images but 'a.mrcs' holds 16x16")
def mixed_box_sizes(folder):
    new_mrc("b.mrcs", np.zeros((2, 20, 20)))
    write("bad.star", star_text().replace("000005@a.mrcs", "000002@b.mrcs"))
    return preprocess()


@case(EXIT_USAGE, "output particles.star is also an input")
def preprocess_output_star_is_the_input(folder):
    return ["preprocess", "particles.star", "-o", "."]


@case(EXIT_USAGE, "output particles.mrcs is also an input")
def preprocess_output_stack_is_an_input(folder):
    shutil.copy("a.mrcs", "particles.mrcs")
    write("bad.star", star_text().replace("@a.mrcs", "@particles.mrcs"))
    return ["preprocess", "bad.star", "-o", "."]


@case(EXIT_USAGE, "output particles.star is also an input")
def embed_output_is_the_input(folder):
    return ["embed", "run", "particles.star", "-o", "particles.star", "--device", "cpu"]


@case(EXIT_USAGE, "output a.mrcs is also an input")
def embed_output_is_a_particle_stack(folder):
    return ["embed", "run", "particles.star", "-o", "a.mrcs", "--device", "cpu"]


@case(EXIT_USAGE, "output run/checkpoint_best.pt is also an input")
def pose_output_is_the_checkpoint(folder):
    return ["pose", "run", "particles.star", "-o", "run/checkpoint_best.pt", "--device", "cpu"]


@case(EXIT_DATA, "checkpoint_best.pt: checkpoint format 99", "cannot be read by tvae-em")
def run_from_an_incompatible_version(folder):
    path = folder / "run" / checkpoint.BEST
    state = torch.load(path, weights_only=True)
    torch.save({**state, "format_version": 99, "version": "9.0.0"}, path)
    return ["embed", "run", "particles.star", "-o", "embedded.star", "--device", "cpu"]


@case(EXIT_DATA, "checkpoint_best.pt: not a readable checkpoint, truncated or corrupt")
def checkpoint_truncated_pose(folder):
    path = folder / "run" / checkpoint.BEST
    write(path, path.read_bytes()[: path.stat().st_size // 2])
    return ["pose", "run", "particles.star", "-o", "posed.star", "--device", "cpu"]


@case(EXIT_DATA, "checkpoint_best.pt: not a readable checkpoint, truncated or corrupt")
def checkpoint_truncated_render(folder):
    path = folder / "run" / checkpoint.BEST
    write(path, path.read_bytes()[:1000])
    return ["render", "run", "-o", "rendered", "--grid", "2", "--device", "cpu"]


@case(EXIT_DATA, "run: run directory without checkpoint_best.pt")
def run_without_checkpoint(folder):
    (folder / "run" / checkpoint.BEST).unlink()
    return ["embed", "run", "particles.star", "-o", "embedded.star", "--device", "cpu"]


@case(EXIT_DATA, "nan.mrcs: image 3 contains NaN or inf pixels")
def pose_on_nan_pixels(folder):
    nan_pixels(folder)
    return ["pose", "run", "bad.star", "-o", "posed.star", "--device", "cpu", "--batch-size", "2"]


@case(EXIT_USAGE, "trained on 16 px images but the particles are 20 px")
def embed_particles_of_another_box(folder):
    new_mrc("b.mrcs", np.zeros((2, 20, 20)))
    write("bad.star", star_text(["000001@b.mrcs 1 mic1.mrc", "000002@b.mrcs 1 mic1.mrc"]))
    return ["embed", "run", "bad.star", "-o", "embedded.star", "--device", "cpu"]


@case(EXIT_USAGE, "No such option '--epoch'", "Did you mean '--epochs'", "tvae-em train --help")
def misspelt_option(folder):
    return ["train", "particles.star", "-o", "run", "--epoch", "3"]


@case(EXIT_USAGE, "'--amp'", "'fast' is not one of", "tvae-em embed --help")
def bad_choice(folder):
    return ["embed", "run", "particles.star", "-o", "embedded.star", "--amp", "fast"]


# --- issue 16: nothing a user runs can destroy an input or a run -----------------------------------------

def embedded_shards(folder, count=2) -> list[str]:
    """Shard results of 'embed --shard i/count' of particles.star, made by the library (not under test here)."""
    for index in range(count):
        infer.embed("run", "particles.star", "embedded.star", shard=(index, count), device="cpu")
    return [f"embedded.shard{index}of{count}.npz" for index in range(count)]


def edit_checkpoint(path, **changes) -> None:
    """Rewrite a checkpoint with some fields changed (None: removed), as a damaged or foreign file would be."""
    state = torch.load(path, weights_only=True)
    state.update(changes)
    torch.save({key: value for key, value in state.items() if value is not None}, path)


def edit_shard(path, **changes) -> None:
    """Rewrite a shard file with some arrays changed (None: removed)."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays.update(changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})


def picks_for(folder, coordinates) -> list[str]:
    """A 64x64 micrograph, a Topaz picks table with ``coordinates`` on it, and the preprocess command."""
    new_mrc("mic1.mrc", np.random.default_rng(3).normal(size=(1, 64, 64)))
    write("picks.txt", "image_name\tx_coord\ty_coord\tscore\n" +
          "".join(f"mic1\t{x}\t{y}\t1.0\n" for x, y in coordinates))
    return ["preprocess", "--picks", "picks.txt", "--micrographs", "mic*.mrc", "--box", "16", "-o", "out"]


def train_command(star="particles.star", *options):
    return ["train", star, "-o", "run2", "--device", "cpu", *TINY_TRAIN_OPTIONS, *options]


@case(EXIT_USAGE, "output particles.star is also an input")
def merge_output_is_the_input_star(folder):  # issue 16, case 1
    return ["merge", *embedded_shards(folder), "-o", "particles.star"]


@case(EXIT_USAGE, "output embedded.shard0of2.npz is also an input")
def merge_output_is_a_shard(folder):  # issue 16, case 1
    return ["merge", *embedded_shards(folder), "-o", "embedded.shard0of2.npz"]


@case(EXIT_USAGE, "output rend/rendered.star is also an input")
def render_output_is_its_z_file(folder):  # issue 16, case 2
    render.render("run", "rend", grid=2, device="cpu")
    return ["render", "run", "-o", "rend", "--z-file", "rend/rendered.star", "--device", "cpu"]


@case(EXIT_USAGE, "output run/checkpoint_last.pt is also an input")
def embed_output_is_a_file_of_the_run(folder):  # issue 16, case 2
    return ["embed", "run", "particles.star", "-o", "run/checkpoint_last.pt", "--device", "cpu"]


@case(EXIT_DATA, "picks.txt: row 2: coordinates x=nan, y=20 are not finite numbers")
def picks_with_a_nan_coordinate(folder):  # issue 16, case 6
    return picks_for(folder, [(20, 20), ("nan", 20)])


@case(EXIT_DATA, "bad.star: data_particles row 2: image index in '123456789012345678901@a.mrcs' is beyond any")
def image_index_beyond_64_bits(folder):  # issue 16, case 6
    write("bad.star", star_text().replace("000002@a.mrcs", "123456789012345678901@a.mrcs"))
    return preprocess()


@case(EXIT_DATA, "embedded.shard1of2.npz: incomplete shard results: star_path missing")
def shard_with_missing_keys(folder):  # issue 16, case 6
    shards = embedded_shards(folder)
    edit_shard(shards[1], **{"source:star_path": None})
    return ["merge", *shards, "-o", "embedded.star"]


@case(EXIT_DATA, "embedded.shard0of2.npz: shard rows are not indices into the 6 rows of the input STAR")
def shard_with_negative_rows(folder):  # issue 16, case 6
    shards = embedded_shards(folder)
    edit_shard(shards[0], rows=-np.arange(3))
    return ["merge", *shards, "-o", "embedded.star"]


@case(EXIT_DATA, "particles.star: the input STAR of the shards is gone (moved or deleted")
def star_moved_between_embed_and_merge(folder):  # issue 16, case 6
    shards = embedded_shards(folder)
    os.rename("particles.star", "moved.star")
    return ["merge", *shards, "-o", "embedded.star"]


@case(EXIT_DATA, "checkpoint_best.pt: invalid model configuration in checkpoint (rotations must be a whole")
def checkpoint_with_a_malformed_model_configuration(folder):  # issue 16, case 6
    path = folder / "run" / checkpoint.BEST
    edit_checkpoint(path, model_config={**torch.load(path, weights_only=True)["model_config"], "rotations": "4"})
    return ["embed", "run", "particles.star", "-o", "embedded.star", "--device", "cpu"]


@case(EXIT_DATA, "checkpoint_best.pt: malformed checkpoint: model_state, epoch missing or not as tvae-em writes")
def checkpoint_with_malformed_weights_and_epoch(folder):  # issue 16, case 6
    edit_checkpoint(folder / "run" / checkpoint.BEST, model_state=[1, 2], epoch="1")
    return ["pose", "run", "particles.star", "-o", "posed.star", "--device", "cpu"]


@case(EXIT_DATA, "checkpoint_last.pt: malformed training state in checkpoint")
def resume_from_a_malformed_optimizer_state(folder):  # issue 16, case 6
    edit_checkpoint(folder / "run" / checkpoint.LAST, n_particles=N_IMAGES, optimizer_state={"state": 5})
    return ["train", "particles.star", "--resume", "run", "--device", "cpu", "--epochs", "2"]


@case(EXIT_DATA, "checkpoint_last.pt: malformed checkpoint: history rows are not log.csv rows")
def resume_from_a_malformed_history(folder):  # issue 16, case 6
    edit_checkpoint(folder / "run" / checkpoint.LAST, history=[{"epoch": 1}])
    return ["train", "particles.star", "--resume", "run", "--device", "cpu"]


@case(EXIT_DATA, "checkpoint_best.pt: model weights contain NaN or infinite values")
def nan_weights_would_reach_the_clustering(folder):  # issue 16, case 6
    path = folder / "run" / checkpoint.BEST
    weights = dict(torch.load(path, weights_only=True)["model_state"])
    name = next(name for name, tensor in weights.items() if tensor.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    edit_checkpoint(path, model_state=weights)
    return ["embed", "run", "particles.star", "-o", "embedded.star", "--clusters", "2", "--device", "cpu"]


def train_with(option, value):
    def setup(folder):
        return train_command("particles.star", option, value)
    return setup


INVALID = "invalid model configuration: "
for option, value, problem in [  # issue 16, case 7: refused before anything is allocated or written
    ("--z-dim", "-1", INVALID + "z_dim must be a whole number >= 1, not -1"),
    ("--z-dim", "0", INVALID + "z_dim must be a whole number >= 1, not 0"),
    ("--rotations", "0", INVALID + "rotations must be a whole number >= 1, not 0"),
    ("--encoder-fields", "0", INVALID + "encoder_fields must be a whole number >= 1, not 0"),
    ("--encoder-kernel", "1000", INVALID + "encoder_kernel 1000 is larger than the 16 px images"),
    ("--fourier-scale", "nan", INVALID + "fourier_scale must be a positive number, not nan"),
    ("--generator-width", str(10 ** 9), "training this model on batches of 8 particles needs about"),
]:
    CASES.append(pytest.param(train_with(option, value), EXIT_USAGE, (problem,), id=f"train {option} {value}"))


@case(EXIT_USAGE, "--ctf on: the particles carry no defocus values (_rlnDefocusU)")
def ctf_asked_for_without_defocus_values(folder):  # issue 13
    return train_command("particles.star", "--ctf", "on")


@case(EXIT_DATA, "bad.star: no _rlnDefocusAngle column for the CTF")
def ctf_from_defocus_without_its_angle(folder):  # issue 13: --ctf auto finds rlnDefocusU and needs the rest
    labels = (*PARTICLE_LABELS, "rlnDefocusU", "rlnDefocusV")
    write("bad.star", star_text([f"{i:06d}@a.mrcs 1 mic1.mrc 15000 14000" for i in range(1, N_IMAGES + 1)],
                                labels))
    return train_command("bad.star")


@case(EXIT_USAGE, "rendering 10,000,000,000 images of 16 px needs about", "render fewer latents or a smaller")
def render_a_huge_grid(folder):  # issue 16, case 7
    return ["render", "run", "-o", "rend", "--grid", "100000", "--device", "cpu"]


@case(EXIT_DATA, "bad.star: data_optics row 1: _rlnImagePixelSize 'nan' is not a positive finite number")
def pixel_size_nan(folder):  # issue 16, case 9
    write("bad.star", star_text().replace("opticsGroup1 1.5", "opticsGroup1 nan"))
    return preprocess()


@case(EXIT_DATA, "bad.star: data_optics row 1: _rlnImagePixelSize 'inf' is not a positive finite number")
def pixel_size_infinite(folder):  # issue 16, case 9
    write("bad.star", star_text().replace("opticsGroup1 1.5", "opticsGroup1 inf"))
    return ["embed", "run", "bad.star", "-o", "embedded.star", "--device", "cpu"]


@case(EXIT_USAGE, "the pose must be finite numbers, got theta nan")
def render_theta_nan(folder):  # issue 16, case 9
    return ["render", "run", "-o", "rend", "--grid", "2", "--theta", "nan", "--device", "cpu"]


@case(EXIT_USAGE, "1x1 px images have no pixel outside the particle circle to normalise by")
def one_pixel_images(folder):  # issue 16, case 9
    new_mrc("tiny.mrcs", np.ones((N_IMAGES, 1, 1)))
    write("bad.star", star_text().replace("@a.mrcs", "@tiny.mrcs"))
    return preprocess()


@case(EXIT_DATA, "the particle images are not normalised (pixel mean 1e+03, std 9", "run 'tvae-em preprocess'")
def raw_images_for_training(folder):  # issue 16, case 10
    write_stack("raw.mrcs", np.random.default_rng(4).normal(1000, 95, size=(N_IMAGES, BOX, BOX)), 1.5)
    write("bad.star", star_text().replace("@a.mrcs", "@raw.mrcs"))
    return train_command("bad.star")


@case(EXIT_DATA, "notmrc.mrcs: not an MRC file (no MRC mode and no 'MAP ' stamp in its header, which begins "
                 "b'root:x:0:0:root:')")
def text_file_as_a_stack(folder):  # issue 16, case 11
    write("notmrc.mrcs", "root:x:0:0:root:/root:/bin/bash\n" * 64)
    write("bad.star", star_text().replace("@a.mrcs", "@notmrc.mrcs"))
    return preprocess()


@case(EXIT_DATA, "checkpoint_best.pt: the model checkpoint changed since the shards were computed; rerun them")
def run_resumed_between_embed_and_merge(folder):  # issue 16, case 12
    shards = embedded_shards(folder)
    path = folder / "run" / checkpoint.BEST
    edit_checkpoint(path, epoch=torch.load(path, weights_only=True)["epoch"] + 1)
    return ["merge", *shards, "-o", "embedded.star"]


@pytest.mark.parametrize(("setup", "code", "fragments"), CASES)
def test_bad_input_gives_one_line_and_leaves_every_file_unchanged(project, capsys, setup, code, fragments):
    assert_refused(project, capsys, setup(project), code, fragments)


def assert_refused(project, capsys, argv, code, fragments) -> None:
    """``argv`` ends with exactly one 'error: ' line holding every fragment, exit ``code``, and every file under
    ``project`` as it was before."""
    before = snapshot(project)
    exit_code, stderr = run_main(argv, capsys)
    lines = message_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and all(fragment in lines[0] for fragment in fragments), lines[0]
    assert exit_code == code
    assert snapshot(project) == before  # inputs byte for byte, and no output or temporary file left


# --- every command refuses each of its inputs as its output (issue 16, case 2) -----------------------------
# Each setup names one input of one command as one of that command's outputs: directly, through a symbolic link
# or as a hard link (an output file of a folder-output command made a link to the input).

INPUT_AS_OUTPUT = []


def input_as_output(setup):
    INPUT_AS_OUTPUT.append(pytest.param(setup, id=setup.__name__))
    return setup


def linked(target, link_path, hard=True) -> None:
    """``link_path`` becomes another name of ``target``: a hard link, or a symbolic link."""
    Path(link_path).parent.mkdir(parents=True, exist_ok=True)
    if hard:
        os.link(target, link_path)
    else:
        os.symlink(os.path.abspath(target), link_path)


def embedded_star(folder) -> str:
    infer.embed("run", "particles.star", "emb.star", clusters=2, device="cpu")
    return "emb.star"


@input_as_output
def preprocess_star(folder):
    linked("particles.star", "out/particles.star")
    return preprocess("particles.star")


@input_as_output
def preprocess_stack(folder):
    linked("a.mrcs", "out/particles.mrcs", hard=False)
    return preprocess("particles.star")


@input_as_output
def preprocess_picks(folder):
    argv = picks_for(folder, [(20, 20)])
    linked("picks.txt", "out/particles.star")
    return argv


@input_as_output
def preprocess_micrograph(folder):
    argv = picks_for(folder, [(20, 20)])
    linked("mic1.mrc", "out/particles.mrcs", hard=False)
    return argv


@input_as_output
def train_star(folder):
    linked("particles.star", "run2/log.csv")
    return train_command()


@input_as_output
def train_stack(folder):
    linked("a.mrcs", "run2/split.npz", hard=False)
    return train_command()


def infer_command(command, out, *options):
    return [command, "run", "particles.star", "-o", out, "--device", "cpu", *options]


for command in ("embed", "pose"):
    for name, argv in [("star", infer_command(command, "particles.star")),
                       ("stack", infer_command(command, "a.mrcs")),
                       ("best_checkpoint", infer_command(command, "run/checkpoint_best.pt")),
                       ("last_checkpoint", infer_command(command, "run/checkpoint_last.pt")),
                       ("run_log", infer_command(command, "run/log.csv")),
                       ("run_split", infer_command(command, "run/split.npz")),
                       ("run_lock", infer_command(command, "run/.lock"))]:
        INPUT_AS_OUTPUT.append(pytest.param(lambda folder, argv=argv: argv, id=f"{command}_{name}"))


@input_as_output
def embed_star_as_its_figure(folder):
    linked("particles.star", "emb_latent.png")
    return infer_command("embed", "emb.star")


@input_as_output
def pose_stack_as_its_figure(folder):
    linked("a.mrcs", "posed_poses.png", hard=False)
    return infer_command("pose", "posed.star")


@input_as_output
def embed_stack_as_a_shard(folder):
    linked("a.mrcs", "emb.shard1of2.npz")
    return infer_command("embed", "emb.star", "--shard", "1/2")


@input_as_output
def pose_index_file(folder):
    write(folder / "ind.txt", "0 2 4\n")
    return infer_command("pose", "ind.txt", "--ind", "ind.txt")


@input_as_output
def train_index_file(folder):
    write(folder / "ind.txt", "0 1 2 3 4\n")
    linked("ind.txt", "run2/log.csv")
    return train_command("particles.star", "--ind", "ind.txt")


@input_as_output
def merge_shard(folder):
    return ["merge", *embedded_shards(folder), "-o", "embedded.shard1of2.npz"]


@input_as_output
def merge_shard_as_its_side_output(folder):
    shards = embedded_shards(folder)
    linked(shards[0], "merged_embedding.npz")
    return ["merge", *shards, "-o", "merged.star"]


@input_as_output
def merge_star(folder):
    return ["merge", *embedded_shards(folder), "-o", "particles.star"]


@input_as_output
def merge_stack(folder):
    shards = embedded_shards(folder)
    linked("a.mrcs", "merged.star", hard=False)
    return ["merge", *shards, "-o", "merged.star"]


@input_as_output
def merge_checkpoint(folder):
    return ["merge", *embedded_shards(folder), "-o", "run/checkpoint_best.pt"]


@input_as_output
def render_checkpoint(folder):
    linked("run/checkpoint_best.pt", "rend/rendered.mrcs")
    return ["render", "run", "-o", "rend", "--grid", "2", "--device", "cpu"]


@input_as_output
def render_z_file(folder):
    render.render("run", "rend", grid=2, device="cpu")
    return ["render", "run", "-o", "rend", "--z-file", "rend/rendered.star", "--device", "cpu"]


@input_as_output
def render_centres(folder):
    linked(embedded_star(folder), "rend/montage.png", hard=False)
    return ["render", "run", "-o", "rend", "--centers-from", "emb.star", "--device", "cpu"]


def posed_clusters(folder) -> str:
    infer.pose("run", embedded_star(folder), "posed.star", device="cpu")
    return "posed.star"


@input_as_output
def averages_star(folder):
    linked(posed_clusters(folder), "avg/averages.star")
    return ["averages", "posed.star", "-o", "avg"]


@input_as_output
def averages_stack(folder):
    posed = posed_clusters(folder)
    linked("a.mrcs", "avg/averages.mrcs", hard=False)
    return ["averages", posed, "-o", "avg"]


@input_as_output
def subset_star(folder):
    linked(embedded_star(folder), "subset.star", hard=False)
    return ["subset", "emb.star", "-o", "subset.star", "--classes", "1"]


@pytest.mark.parametrize("setup", INPUT_AS_OUTPUT)
def test_every_command_refuses_each_of_its_inputs_as_its_output(project, capsys, setup):
    assert_refused(project, capsys, setup(project), EXIT_USAGE, ("is also an input", "choose another output"))


# --- the real process: exit status, --debug, a full disk ------------------------------------------------

def run_process(args, cwd, file_size_limit=None) -> subprocess.CompletedProcess:
    """``python -m tvae_em.cli args`` in ``cwd``; with a file-size limit, writes beyond it fail with EFBIG
    (SIGXFSZ ignored), which is how a full disk looks to the program."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "tvae_em.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=limit_file_size if file_size_limit else None)


def test_process_exit_status_and_debug_traceback(project):
    image_index_zero(project)
    before = snapshot(project)
    plain = run_process(preprocess(), project)
    assert plain.returncode == EXIT_DATA and plain.stdout == ""
    assert message_lines(plain.stderr) == ["error: bad.star: data_particles row 4: image index 0 in "
                                           "'000000@a.mrcs' (RELION counts images from 1)"]
    debug = run_process(["--debug", *preprocess()], project)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "InputError: bad.star" in debug.stderr
    assert snapshot(project) == before


def test_warnings_are_one_line_without_source_locations(project):
    """An untrained model's poses are uncertain: embed says so in one 'warning:' line, as the user reads it."""
    done = run_process(["embed", "run", "particles.star", "-o", "embedded.star", "--device", "cpu"], project)
    assert done.returncode == 0
    warned = [line for line in message_lines(done.stderr) if line.startswith("warning:")]
    assert len(warned) == 1 and "most poses are uncertain" in warned[0]
    assert ".py:" not in done.stderr and "UserWarning" not in done.stderr


def test_full_disk_while_preprocessing(project):
    """The 60 output images (61 KiB) do not fit under a 40 KiB file-size limit."""
    rows = [f"{i % N_IMAGES + 1:06d}@a.mrcs 1 mic1.mrc" for i in range(60)]
    write("many.star", star_text(rows))
    before = snapshot(project)
    result = run_process(preprocess("many.star"), project, file_size_limit=40 * 1024)
    assert result.returncode == EXIT_OUTPUT
    assert message_lines(result.stderr) == ["error: out/particles.mrcs: cannot write: File too large"]
    assert snapshot(project) == before  # nothing under out/, not even a temporary file
    assert run_process(preprocess("many.star"), project).returncode == 0  # fits without the limit


def test_full_disk_while_saving_a_checkpoint(project):
    before = snapshot(project)
    result = run_process(["train", "particles.star", "-o", "run2", "--epochs", "1", "--device", "cpu",
                          *TINY_TRAIN_OPTIONS], project, file_size_limit=20 * 1024)
    assert message_lines(result.stderr) == ["error: run2/checkpoint_best.pt: cannot write: File too large"]
    assert result.returncode == EXIT_OUTPUT
    left = snapshot(project)
    assert {name: left[name] for name in before} == before
    assert not [name for name in left if name.startswith("run2/") and ".pt" in name]  # not even a temporary


@pytest.mark.slow
def test_full_disk_leaves_none_of_a_commands_outputs(project):
    """Issue 16, case 8: embed's STAR and npz fit under the limit, its figure does not; render's stack and STAR
    fit, its montage does not. Either command leaves none of its outputs, and says which file did not fit."""
    before = snapshot(project)
    embedded = run_process(["embed", "run", "particles.star", "-o", "emb.star", "--clusters", "2", "--device",
                            "cpu"], project, file_size_limit=12 * 1024)
    assert message_lines(embedded.stderr) == ["error: emb_latent.png: cannot write: File too large"]
    rendered = run_process(["render", "run", "-o", "rend", "--grid", "3", "--device", "cpu"], project,
                           file_size_limit=12 * 1024)
    assert message_lines(rendered.stderr) == ["error: rend/montage.png: cannot write: File too large"]
    assert embedded.returncode == rendered.returncode == EXIT_OUTPUT
    assert snapshot(project) == before
    assert not list((project / "rend").iterdir())  # the folder is made, nothing is left in it


def run_slowed(args, cwd, target: str) -> subprocess.Popen:
    """``tvae-em args`` in a process where ``target`` ('module:Class.method') first touches 'started', then
    sleeps a minute: a command caught in the middle of its work."""
    module, attribute = target.split(":")
    owner, method = attribute.split(".")
    code = (f"import sys, time, pathlib\nimport {module} as m\n"
            f"def slow(*args, **kwargs):\n    pathlib.Path('started').touch()\n    time.sleep(60)\n"
            f"m.{owner}.{method} = slow\nfrom tvae_em.cli import main\nmain(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize(("args", "target"), [
    (preprocess("particles.star"), "tvae_em.preprocess:_Pipeline.__call__"),  # while the stack is written
    (["embed", "run", "particles.star", "-o", "emb.star", "--device", "cpu"], "tvae_em.model.vae:TargetVAE.encode"),
], ids=["preprocess", "embed"])
def test_sigterm_stops_a_command_at_once_leaving_nothing(project, args, target):
    """Issue 16, case 3: exit 130 with one line, within seconds, and no output or temporary file left."""
    before = snapshot(project)
    process = run_slowed(args, project, target)
    deadline = time.monotonic() + 120
    while not (project / "started").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.05)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=50)
    assert time.monotonic() - signalled < 10  # not the minute the step was to take
    assert process.returncode == EXIT_INTERRUPTED
    assert message_lines(stderr) == ["error: SIGTERM received: stopped, no partial output left behind"]
    (project / "started").unlink()
    left = snapshot(project)
    assert left == before, set(left) ^ set(before)


def test_a_fifo_is_refused_instead_of_waited_on(project):
    """Issue 16, case 11: reading a FIFO would wait for a writer forever."""
    os.mkfifo("fifo.star")
    os.mkfifo("fifo.mrcs")
    for name in ("fifo.star", "fifo.mrcs"):
        result = run_process(preprocess(name), project)
        assert result.returncode == EXIT_DATA
        assert message_lines(result.stderr) == [f"error: {name}: not a regular file (a FIFO, socket or device); "
                                                "give the file itself"]


def test_a_second_train_into_a_run_being_trained_is_refused(project, capsys):
    """Issue 16, case 4: while a training process holds run2's lock, another 'train -o run2' stops at once."""
    run2 = project / "run2"
    run2.mkdir()
    with open(run2 / checkpoint.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first process's lock
        assert_refused(project, capsys, train_command(), EXIT_USAGE,
                       ("run2 is in use by another process (a training run writes into it)",))
    assert run_main(train_command("particles.star", "--epochs", "1"), capsys)[0] == 0  # once it is released


def test_a_value_with_both_kinds_of_quote_survives_the_pipeline(project, capsys):
    """Issue 16, case 5: the tool reads back its own output whatever the input's values hold."""
    name = 'my "best" mic.mrc'
    write("quoted.star", star_text([f"{i:06d}@a.mrcs 1 '{name}'" for i in range(1, N_IMAGES + 1)]))
    assert run_main(["preprocess", "quoted.star", "-o", "prep"], capsys)[0] == 0
    assert run_main(["pose", "run", "prep/particles.star", "-o", "posed.star", "--device", "cpu"], capsys)[0] == 0
    for path in ("prep/particles.star", "posed.star"):
        assert set(read_star(path)["particles"]["rlnMicrographName"]) == {name}
