"""Bad inputs through the real entry point (``tvae_em.cli.main``, as the ``tvae-em`` script runs it).

Every case must end with exactly one stderr line 'error: <file>: <problem>' (progress bars aside), no
traceback, the documented exit code, and the folder exactly as it was: inputs unchanged byte for byte and
no output, complete or partial, left behind.
"""

import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from tvae_em import checkpoint
from tvae_em.cli import main
from tvae_em.errors import EXIT_DATA, EXIT_OUTPUT, EXIT_USAGE
from tvae_em.io.stack import write_stack
from tvae_em.model import ModelConfig
from tvae_em.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
BOX, N_IMAGES = 16, 6
TINY_MODEL = dict(image_size=BOX, rotations=4, z_dim=2, encoder_fields=4, encoder_kernel=5,
                  generator_width=16, generator_depth=1, fourier_features=16, likelihood="gaussian")
TINY_TRAIN_OPTIONS = ["--rotations", "4", "--encoder-fields", "4", "--encoder-kernel", "5",
                      "--generator-width", "16", "--generator-depth", "1", "--fourier-features", "16",
                      "--batch-size", "8"]
PROGRESS_RE = re.compile(r"^[\w ]+(/\d+)?: +\d+%\|")  # a tqdm bar: 'preprocess:  50%|#####     | 3/6 ...'
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


def message_lines(stderr: str) -> list[str]:
    """stderr lines (any Unicode line break splits) without the progress bars tqdm draws."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_RE.match(line)]


def run_main(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


class ArrayParticles:
    """In-memory particle source for training: len() and read(indices)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def read(self, indices):
        return self.images[indices]


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


@pytest.mark.parametrize(("setup", "code", "fragments"), CASES)
def test_bad_input_gives_one_line_and_leaves_every_file_unchanged(project, capsys, setup, code, fragments):
    argv = setup(project)
    before = snapshot(project)
    exit_code, stderr = run_main(argv, capsys)
    lines = message_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and all(fragment in lines[0] for fragment in fragments), lines[0]
    assert exit_code == code
    assert snapshot(project) == before  # inputs byte for byte, and no output or temporary file left


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
