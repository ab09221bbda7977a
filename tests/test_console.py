"""What tvae-em tells the person running it (tvae_em.console): -q / -v, progress where stderr is not a terminal
(pytest's capture, a pipe), and the run.log and config.json a training run keeps."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from console_lines import PROGRESS_LINE, message_lines
from tiny_run import BOX, save_run

from tvae_em import __version__, console
from tvae_em import checkpoint as ckpt
from tvae_em.cli import main
from tvae_em.config import ModelConfig
from tvae_em.errors import EXIT_DATA, EXIT_USAGE
from tvae_em.io.stack import write_stack

REPO = Path(__file__).resolve().parents[1]
DEVICE_TEXT = "bfloat16 autocast off, 1 process, 1 CPU thread and 0 reading processes each"
TINY_TRAINING = ["--rotations", "4", "--encoder-fields", "4", "--encoder-kernel", "9", "--generator-width", "16",
                 "--generator-depth", "1", "--fourier-features", "16", "--batch-size", "8", "--amp", "off",
                 "--device", "cpu"]


def tvae_em(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``tvae-em argv`` run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


def particle_stack(path: Path, count: int) -> Path:
    """``count`` images of BOX px, normalised as preprocess leaves them (mean 0, std 1), 2 A per pixel."""
    write_stack(path, np.random.default_rng(0).normal(size=(count, BOX, BOX)).astype(np.float32), 2.0)
    return path


def test_progress_off_a_terminal_is_a_line_per_tenth_without_carriage_returns(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_run(run_dir)
    stack = particle_stack(tmp_path / "particles.mrcs", 25)
    code, err = tvae_em(["embed", str(run_dir), str(stack), "-o", str(tmp_path / "embedded.star"),
                         "--batch-size", "10", "--device", "cpu"], capsys)
    assert code == 0 and "\r" not in err
    # batches of 10, 10 and 5 particles reach 4, 8 and 10 tenths: one line each, none for the tenths passed over
    progress = [line.split(" (")[0] + " " + line.split(" (")[1].split(",")[0]
                for line in err.splitlines() if PROGRESS_LINE.match(line)]
    assert progress == ["encoding: 40 % 10/25 particles", "encoding: 80 % 20/25 particles",
                        "encoding: 100 % 25/25 particles"]
    assert message_lines(err)[-1] == f"wrote {tmp_path / 'embedded.star'}"


def test_progress_on_a_terminal_is_a_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "_stderr_is_terminal", lambda: True)
    code, err = tvae_em(["preprocess", str(particle_stack(tmp_path / "particles.mrcs", 16)), "-o",
                         str(tmp_path / "prep")], capsys)
    assert code == 0
    assert "\r" in err and "16/16" in err and not any(PROGRESS_LINE.match(line) for line in err.splitlines())


def test_quiet_preprocess_says_nothing_on_success_and_still_the_error(tmp_path, capsys):
    stack = particle_stack(tmp_path / "particles.mrcs", 16)
    code, err = tvae_em(["preprocess", str(stack), "-o", str(tmp_path / "prep")], capsys)
    assert code == 0 and message_lines(err) == [f"wrote {tmp_path / 'prep' / 'particles.star'}"]
    assert [line for line in err.splitlines() if PROGRESS_LINE.match(line)] != []
    for argv in (["-q", "preprocess", str(stack), "-o", str(tmp_path / "quiet")],
                 ["preprocess", str(stack), "-o", str(tmp_path / "quiet_after"), "--quiet"]):
        code, err = tvae_em(argv, capsys)
        assert code == 0 and err == ""
        assert (Path(argv[argv.index("-o") + 1]) / "particles.star").is_file()
    code, err = tvae_em(["-q", "preprocess", str(tmp_path / "missing.mrcs"), "-o", str(tmp_path / "none")], capsys)
    assert code == EXIT_DATA and err.splitlines() == [f"error: {tmp_path / 'missing.mrcs'}: file not found"]
    assert console.level() == console.NORMAL  # the invocation's level ends with it


def test_quiet_still_shows_a_warning_on_a_pipe(tmp_path, make_stack):
    """A stack without a pixel size is read with a warning, which -q does not hide (a real process: pytest
    would capture the warning itself)."""
    make_stack("nopixel.mrcs", np.random.default_rng(0).normal(size=(4, BOX, BOX)).astype(np.float32), apix=0.0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tvae_em.cli", "preprocess", "nopixel.mrcs", "-o", "prep", "-q"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == ""
    assert done.stderr.splitlines() == ["warning: nopixel.mrcs: no pixel size in the STAR file nor in the MRC "
                                        "header; assuming 1.0 A"]


def test_quiet_and_verbose_together_are_refused(tmp_path, capsys):
    code, err = tvae_em(["-q", "preprocess", "particles.mrcs", "-o", str(tmp_path / "prep"), "-v"], capsys)
    assert code == EXIT_USAGE and err.startswith("error: -q and -v contradict each other")


def test_a_run_keeps_its_log_and_configuration_and_a_resume_appends(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    particle_stack(tmp_path / "particles.mrcs", 16)  # 14 for training in 2 batches, 2 for validation
    started = ["-v", "train", "particles.mrcs", "-o", "run", "--epochs", "1", "--threads", "1", *TINY_TRAINING]
    code, err = tvae_em(started, capsys)
    assert code == 0 and "\r" not in err
    lines = message_lines(err)
    checkpoint = ckpt.read_checkpoint(tmp_path / "run" / ckpt.LAST)
    model = checkpoint["model_config"]
    assert lines[:2] == [f"particles: {tmp_path / 'particles.mrcs'}, 16 (14 for training, 2 for validation)",
                         f"device: cpu, {DEVICE_TEXT}"]
    assert lines[2] == "model: " + ", ".join(f"{key}={value}" for key, value in model.items())
    assert lines[3].startswith("training: batch_size=8, epochs=1, ")
    assert len(lines) == 5 and lines[4].startswith("epoch 1: training ELBO ")  # no line per batch
    assert_configuration(tmp_path / "run", started, checkpoint)

    first_log = (tmp_path / "run" / ckpt.RUN_LOG).read_text()
    header = first_log.splitlines()[:5]
    assert header[0].startswith("=== ") and header[1] == "command: " + shlex.join(["tvae-em", *started])
    assert header[2].startswith(f"versions: tvae-em {__version__}, python ") and ", torch " in header[2]
    assert header[3].startswith("host: ") and header[4] == f"device: cpu, {DEVICE_TEXT}"
    assert [line[9:] for line in first_log.splitlines()[5:]] == lines  # 'HH:MM:SS ' and each line told

    resumed = ["train", "particles.mrcs", "--resume", "run", "--epochs", "2", "-q", "--device", "cpu"]
    code, err = tvae_em(resumed, capsys)
    assert code == 0 and err == ""
    log = (tmp_path / "run" / ckpt.RUN_LOG).read_text()
    assert log.startswith(first_log)
    appended = log[len(first_log):].splitlines()
    assert appended[0].startswith("=== ") and appended[1] == "command: " + shlex.join(["tvae-em", *resumed])
    assert any(line[9:].startswith("epoch 2: training ELBO ") for line in appended)  # recorded, though -q
    assert_configuration(tmp_path / "run", resumed, ckpt.read_checkpoint(tmp_path / "run" / ckpt.LAST))


def assert_configuration(run_dir: Path, argv: list[str], checkpoint: dict) -> None:
    """config.json holds the command line, the input and the configurations the checkpoint was trained with."""
    config = json.loads((run_dir / ckpt.CONFIG).read_text())
    assert config["command"] == shlex.join(["tvae-em", *argv]) and config["versions"]["tvae-em"] == __version__
    assert config["inputs"] == {"star": str(run_dir.parent / "particles.mrcs"), "datadir": None,
                                "ctf_request": None if "--resume" in argv else "auto"}
    assert ModelConfig(**config["model_config"]) == ckpt.model_config_from(checkpoint, run_dir)
    assert config["train_config"] == checkpoint["train_config"]
    assert config["device"] == "cpu" and config["bf16_autocast"] is False
