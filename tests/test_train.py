"""Training loop: outputs, checkpoints, exact resume, divergence, refusals, signals and torchrun (Gloo)."""

import csv
import dataclasses
import fcntl
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from console_lines import message_lines
from relion_files import optics_block

from tvae_em import __version__
from tvae_em import checkpoint as ckpt
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.errors import EXIT_INTERRUPTED, InputError, TvaeError, UsageError
from tvae_em.io import stack
from tvae_em.model import TargetVAE
from tvae_em.model.vae import COARSEST_CYCLES
from tvae_em.runtime import Stop, interruptible_backward, stop_on_signals
from tvae_em.train import (
    Interrupted,
    TrainingDiverged,
    _Trainer,
    _WaitClock,
    make_split,
    train,
    train_from_star,
)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(image_size=24, encoder_fields=4, encoder_kernel=9, generator_width=32, generator_depth=2,
             fourier_features=16, likelihood="bernoulli")
N_PARTICLES = 40  # 30 training particles in 4 batches of 8, 10 for validation


class ArrayParticles(stack.ArrayParticles):
    """tvae_em.io.stack.ArrayParticles logging its reads, which must ask for sorted, distinct indices, each one
    taking ``delay_s``."""

    def __init__(self, images: np.ndarray, delay_s: float = 0.0):
        super().__init__(images)
        self.delay_s, self.reads = delay_s, []

    def read(self, indices: np.ndarray) -> np.ndarray:
        assert np.all(np.diff(indices) > 0), "reads must ask for sorted, distinct indices"
        self.reads.append(np.array(indices))
        time.sleep(self.delay_s)
        return super().read(indices)


def blobs(n: int = N_PARTICLES, size: int = 24, seed: int = 0) -> np.ndarray:
    """Elongated Gaussian blobs at random positions and angles, values in [0, 1] (bernoulli-compatible)."""
    rng = np.random.default_rng(seed)
    coords = np.arange(size) - size // 2
    y, x = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((n, size, size), np.float32)
    for i in range(n):
        angle, (dx, dy) = rng.uniform(0, np.pi), rng.uniform(-3, 3, 2)
        u = (x - dx) * np.cos(angle) + (y - dy) * np.sin(angle)
        v = -(x - dx) * np.sin(angle) + (y - dy) * np.cos(angle)
        images[i] = np.exp(-(u / 5) ** 2 - (v / 2) ** 2)
    return images


def tiny_train_config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=8, epochs=2, val_fraction=0.25, num_workers=0, progress=False),
                          **changes})


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def parameters(state: dict) -> dict:
    derived = (".filter", ".expanded_bias")  # escnn caches, recomputed from the weights
    return {name: tensor for name, tensor in state.items() if not name.endswith(derived)}


def assert_same_parameters(state_a: dict, state_b: dict) -> None:
    a, b = parameters(state_a), parameters(state_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def leftover_temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if ".part" in p.name]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete 2-epoch run shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("run")
    particles = ArrayParticles(blobs())
    result = train(ModelConfig(**MODEL), tiny_train_config(), particles, run_dir)
    return run_dir, result, particles


def test_log_has_one_row_per_epoch_with_consistent_terms(finished_run):
    run_dir, result, _ = finished_run
    rows = read_log(run_dir)
    assert tuple(rows[0].keys()) == ckpt.LOG_COLUMNS
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    for row in rows:
        values = {key: float(value) for key, value in row.items()}
        assert all(math.isfinite(v) for v in values.values())
        kl = values["kl_tr"] + values["kl_theta"] + values["kl_z"] + values["kl_shift"]
        assert values["train_elbo"] == pytest.approx(values["reconstruction"] - kl, rel=1e-5)
        assert values["lr"] == TrainConfig().lr and values["seconds"] > 0 and 0 <= values["data_wait"] < 1
    assert result.epochs == 2 and result.stop_reason == "max_epochs"
    assert result.metrics["epoch"] == 2 and result.best_metrics["epoch"] == result.best_epoch
    assert (run_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not leftover_temporaries(run_dir)


def test_split_is_recorded_deterministic_and_respected(finished_run):
    run_dir, _, particles = finished_run
    split = np.load(run_dir / "split.npz")
    train_idx, val_idx = split["train"], split["val"]
    assert len(val_idx) == 10 and len(train_idx) == 30
    assert np.array_equal(np.union1d(train_idx, val_idx), np.arange(N_PARTICLES))
    expected = make_split(N_PARTICLES, 0.25, seed=0)
    assert np.array_equal(train_idx, expected[0]) and np.array_equal(val_idx, expected[1])
    assert not np.array_equal(make_split(N_PARTICLES, 0.25, seed=1)[1], val_idx)
    # every read is one batch (memory bounded by the batch) from one side of the split only
    for indices in particles.reads:
        assert len(indices) <= 8
        assert np.isin(indices, train_idx).all() or np.isin(indices, val_idx).all()
    trained = np.concatenate([r for r in particles.reads if np.isin(r, train_idx).all()])
    assert np.array_equal(np.sort(trained), np.sort(np.tile(train_idx, 2)))  # each particle once per epoch


def test_checkpoint_holds_everything_needed_to_continue(finished_run):
    run_dir, result, _ = finished_run
    state = ckpt.read_checkpoint(result.last_checkpoint)
    assert state["format_version"] == ckpt.FORMAT_VERSION and state["version"] == __version__
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert state["model_config"] == ModelConfig(**MODEL).to_dict()
    assert state["train_config"] == tiny_train_config().to_dict()
    assert state["optimizer_state"]["param_groups"][0]["lr"] == TrainConfig().lr
    assert len(state["optimizer_state"]["state"]) == len(list(TargetVAE(ModelConfig(**MODEL)).parameters()))
    assert state["scheduler_state"]["patience"] == 10 - 1 and state["scheduler_state"]["factor"] == 0.5  # see train.py
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["n_particles"] == N_PARTICLES
    best = ckpt.read_checkpoint(result.best_checkpoint)
    assert best["epoch"] == result.best_epoch


def test_load_model_returns_the_best_weights_ready_for_inference(finished_run):
    run_dir, result, particles = finished_run
    model, config = ckpt.load_model(run_dir, for_inference=False)
    assert config == ModelConfig(**MODEL) and not model.training
    best = ckpt.read_checkpoint(result.best_checkpoint)["model_state"]
    assert_same_parameters(ckpt.model_state(model), best)  # the bases rebuilt, matching their fingerprints
    images = torch.from_numpy(particles.images[:3])
    model.encoder.export()
    estimate = model.encode(images)
    assert estimate.z_mu.shape == (3, 2) and torch.isfinite(estimate.theta).all()
    # what inference loads: the encoder from the filters the best epoch exported, which computes the same
    plain, _ = ckpt.load_model(run_dir)
    for name, value in vars(plain.encode(images)).items():
        assert torch.equal(value, getattr(estimate, name)), name


def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path):
    # without coarse-to-fine, whose band follows the epochs first planned (see the band test below)
    config, particles = ModelConfig(**MODEL), ArrayParticles(blobs())
    uninterrupted = tmp_path / "uninterrupted"
    train(config, tiny_train_config(epochs=2, coarse_to_fine=0.0), particles, uninterrupted)
    train(config, tiny_train_config(epochs=1, coarse_to_fine=0.0), particles, tmp_path / "resumed")
    # resume may change epochs and num_workers (here: read through a worker process) without changing results
    result = train(None, tiny_train_config(epochs=2, coarse_to_fine=0.0, num_workers=1), particles,
                   tmp_path / "resumed", resume=True)
    assert result.epochs == 2
    assert_same_parameters(ckpt.read_checkpoint(tmp_path / "resumed" / ckpt.LAST)["model_state"],
                           ckpt.read_checkpoint(uninterrupted / ckpt.LAST)["model_state"])
    resumed_log, full_log = read_log(tmp_path / "resumed"), read_log(uninterrupted)
    for column in ("train_elbo", "val_elbo", "kl_tr", "lr"):
        assert [r[column] for r in resumed_log] == [r[column] for r in full_log]


def test_run_directory_refusals(tmp_path, finished_run):
    run_dir, _, particles = finished_run
    config = ModelConfig(**MODEL)
    with pytest.raises(UsageError, match="already holds a training run"):
        train(config, tiny_train_config(), particles, run_dir)
    with pytest.raises(UsageError, match="lr"):
        train(config, tiny_train_config(lr=1e-3), particles, run_dir, resume=True)
    with pytest.raises(UsageError, match="z_dim"):
        train(ModelConfig(**MODEL, z_dim=3), tiny_train_config(), particles, run_dir, resume=True)
    with pytest.raises(UsageError, match="40 particles, the input has 39"):
        train(config, tiny_train_config(), ArrayParticles(blobs(39)), run_dir, resume=True)
    with pytest.raises(InputError, match="no such run directory"):
        train(config, tiny_train_config(), particles, tmp_path / "missing", resume=True)
    # a finished run resumed with the same maximum does nothing more
    reads = len(particles.reads)
    assert train(None, tiny_train_config(), particles, run_dir, resume=True).epochs == 2
    assert len(particles.reads) == reads


def test_damaged_or_foreign_checkpoints_are_refused_naming_the_file(tmp_path, finished_run):
    run_dir, result, _ = finished_run
    data = result.last_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"{truncated}: not a readable checkpoint"):
        ckpt.load_model(truncated)

    state = ckpt.read_checkpoint(result.last_checkpoint)
    future = tmp_path / "future.pt"
    torch.save({**state, "format_version": ckpt.FORMAT_VERSION + 1}, future)
    with pytest.raises(InputError, match=f"{future}: checkpoint format {ckpt.FORMAT_VERSION + 1}"):
        ckpt.load_model(future)

    damaged_run = tmp_path / "run"
    damaged_run.mkdir()
    (damaged_run / ckpt.LAST).write_bytes(data[:1000])
    with pytest.raises(InputError, match=f"{damaged_run / ckpt.LAST}: not a readable"):
        train(None, tiny_train_config(), ArrayParticles(blobs()), damaged_run, resume=True)
    with pytest.raises(InputError, match="without checkpoint_best.pt"):
        ckpt.load_model(damaged_run)
    with pytest.raises(InputError, match="no such run directory or checkpoint"):
        ckpt.load_model(tmp_path / "nothing")


def test_checkpoints_of_format_1_are_read_as_the_same_model(tmp_path, finished_run):
    """Format 1 stated fourier_scale per unit of the generator's frame and had no Fourier feature gains."""
    _, result, _ = finished_run
    state = ckpt.read_checkpoint(result.best_checkpoint)
    per_unit = state["model_config"]["fourier_scale"] * MODEL["image_size"] / 2
    old_config = {**state["model_config"], "fourier_scale": per_unit}
    old_state = {k: v for k, v in state["model_state"].items() if k != "band_fraction"}
    old = tmp_path / "format1.pt"
    torch.save({**state, "format_version": 1, "model_config": old_config, "model_state": old_state}, old)
    model, config = ckpt.load_model(old)
    current, current_config = ckpt.load_model(result.best_checkpoint)
    assert config == current_config
    z = torch.zeros(2, MODEL.get("z_dim", 2))
    assert torch.equal(model.decode(z), current.decode(z))


def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    elbo = TargetVAE.elbo
    training_calls = []

    def poisoned_elbo(self, images, generator=None, transfer=None):
        terms = elbo(self, images, generator, transfer)
        if torch.is_grad_enabled():
            training_calls.append(1)
            if len(training_calls) == 6:  # epoch 2, batch 2 (4 training batches per epoch)
                return dataclasses.replace(terms, elbo=terms.elbo * float("nan"))
        return terms

    monkeypatch.setattr(TargetVAE, "elbo", poisoned_elbo)
    with pytest.raises(TrainingDiverged, match="epoch 2, batch 2.*holds epoch 1"):
        train(ModelConfig(**MODEL), tiny_train_config(epochs=3), ArrayParticles(blobs()), tmp_path)
    state = ckpt.read_checkpoint(tmp_path / ckpt.LAST)
    assert state["epoch"] == 1 and len(read_log(tmp_path)) == 1
    assert all(torch.isfinite(t).all() for t in state["model_state"].values())
    assert not leftover_temporaries(tmp_path)


def test_bad_images_are_refused_naming_the_particles(tmp_path):
    images = blobs()
    train_idx, _ = make_split(N_PARTICLES, 0.25, seed=0)
    images[train_idx[3]] = np.nan
    with pytest.raises(TvaeError, match=f"particles {train_idx[3]} \\(0-based\\) contain NaN"):
        train(ModelConfig(**MODEL), tiny_train_config(), ArrayParticles(images), tmp_path / "nan")
    with pytest.raises(TvaeError, match="outside \\[0, 1\\]"):
        train(ModelConfig(**MODEL), tiny_train_config(), ArrayParticles(blobs() * 2 - 0.5),
              tmp_path / "range")
    with pytest.raises(TvaeError, match="24x24 pixels, the model expects 28x28"):
        train(ModelConfig(**{**MODEL, "image_size": 28}), tiny_train_config(), ArrayParticles(blobs()),
              tmp_path / "size")


def test_read_errors_in_worker_processes_reach_the_caller_intact(tmp_path):
    class DamagedParticles(ArrayParticles):
        def read(self, indices):
            raise InputError("stack.mrcs", "image 7 contains NaN or inf pixels")

    with pytest.raises(InputError, match="^stack.mrcs: image 7 contains NaN") as raised:
        train(ModelConfig(**MODEL), tiny_train_config(num_workers=1), DamagedParticles(blobs()), tmp_path)
    assert (raised.value.path, raised.value.problem) == ("stack.mrcs", "image 7 contains NaN or inf pixels")


def test_train_from_an_mrcs_stack_takes_the_box_as_image_size(tmp_path, make_stack):
    stack = make_stack("particles.mrcs", blobs())
    options = {key: value for key, value in MODEL.items() if key != "image_size"}
    result = train_from_star(stack, tmp_path / "run", tiny_train_config(epochs=1), model_options=options)
    assert result.epochs == 1
    assert ckpt.load_model(tmp_path / "run")[1] == ModelConfig(**MODEL)
    # resuming needs no model options: the run's configuration is used
    resumed = train_from_star(stack, tmp_path / "run", tiny_train_config(epochs=1), resume=True)
    assert resumed.epochs == 1


def test_plateau_halves_the_learning_rate_then_stops_early(tmp_path, monkeypatch):
    # a validation loss that never improves after epoch 1
    monkeypatch.setattr(_Trainer, "_validate", lambda self, epoch: {"elbo": -100.0})
    config = tiny_train_config(epochs=50, patience_lr=1, early_stop=2, lr=2e-4)
    result = train(ModelConfig(**MODEL), config, ArrayParticles(blobs()), tmp_path)
    assert (result.epochs, result.best_epoch, result.stop_reason) == (3, 1, "early_stop")
    assert [float(row["lr"]) for row in read_log(tmp_path)] == [2e-4, 2e-4, 1e-4]
    # an early-stopped run stays stopped when resumed
    assert train(None, config, ArrayParticles(blobs()), tmp_path, resume=True).epochs == 3


def test_learning_rate_halves_after_exactly_patience_lr_flat_epochs(tmp_path, monkeypatch):
    """The paper halves after 10 epochs without improvement; ReduceLROnPlateau's own patience counts one more."""
    monkeypatch.setattr(_Trainer, "_validate", lambda self, epoch: {"elbo": -100.0})
    config = tiny_train_config(epochs=6, patience_lr=3, early_stop=10, lr=1e-3)
    train(ModelConfig(**MODEL), config, ArrayParticles(blobs()), tmp_path)
    # epoch 1 is the best; epochs 2-4 are the three flat ones; epoch 5 starts at half the rate
    assert [float(row["lr"]) for row in read_log(tmp_path)] == [1e-3] * 4 + [5e-4] * 2


def test_presets_are_the_default_recipe_and_the_papers():
    assert TrainConfig.preset("default") == TrainConfig()
    paper = TrainConfig.preset("paper", seed=3)
    assert (paper.batch_size, paper.epochs, paper.lr, paper.coarse_to_fine, paper.seed) == (100, 500, 2e-4, 0.0, 3)
    assert (paper.patience_lr, paper.lr_factor, paper.early_stop) == (10, 0.5, 20)
    with pytest.raises(UsageError, match="unknown training preset"):
        TrainConfig.preset("fast")


def test_generator_band_opens_coarse_to_fine_over_the_planned_epochs(tmp_path, monkeypatch):
    """Every step sets the band from the epochs done; it is fully open from half of the first plan on, also
    when a resumed run extends the plan."""
    fractions = []
    original = TargetVAE.open_band
    monkeypatch.setattr(TargetVAE, "open_band", lambda self, f: (fractions.append(f), original(self, f))[1])
    particles = ArrayParticles(blobs())
    train(ModelConfig(**MODEL), tiny_train_config(epochs=2, coarse_to_fine=0.5), particles, tmp_path)
    steps = -(-30 // 8)  # 30 training particles in batches of 8
    assert fractions == pytest.approx([(e + b / steps) / 1.0 for e in range(2) for b in range(steps)])
    assert ckpt.read_checkpoint(tmp_path / ckpt.LAST)["model_state"]["band_fraction"] == 1  # open in epoch 2
    fractions.clear()
    train(None, tiny_train_config(epochs=3, coarse_to_fine=0.5), particles, tmp_path, resume=True)
    assert min(fractions) >= 2.0  # measured against the first plan's 1 band epoch, not 1.5


def test_a_closed_band_hides_high_frequencies_from_both_generator_and_encoder():
    torch.manual_seed(0)
    model = TargetVAE(ModelConfig(**{**MODEL, "fourier_features": 256})).eval()
    size = MODEL["image_size"]
    frequency = model.generator.fourier_b.norm(dim=0) / (size / 2)
    high = torch.cat([frequency, frequency]) > COARSEST_CYCLES / size  # columns of the coordinate layer
    z = torch.randn(2, 2)
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    image = torch.randn(1, size, size)
    checker = torch.cos(math.pi * (rows + rows.T))[None]  # 0.5 cycles per pixel
    model.open_band(0.0)
    before, encoded = model.decode(z), model.encode(image)
    with torch.no_grad():
        model.generator.coord_layer.weight[:, high] += 1.0
    assert torch.equal(model.decode(z), before)  # the features above the band are not used
    assert torch.allclose(model.encode(image + checker).z_mu, encoded.z_mu, atol=1e-5)  # nor seen
    model.open_band(1.0)
    assert not torch.allclose(model.decode(z), before)
    assert not torch.allclose(model.encode(image + checker).z_mu, model.encode(image).z_mu, atol=1e-5)


# --- signals and torchrun, in real processes ---------------------------------------------------------------

def test_sigint_drops_the_epoch_in_progress_and_keeps_completed_ones(tmp_path):
    class SignallingParticles(ArrayParticles):
        def read(self, indices):
            if len(self.reads) == 7:  # epoch 2, batch 2 (6 reads per epoch: 4 training, 2 validation)
                os.kill(os.getpid(), signal.SIGINT)
            return super().read(indices)

    with pytest.raises(Interrupted, match="SIGINT received in epoch 2.*holds epoch 1") as raised:
        train(ModelConfig(**MODEL), tiny_train_config(epochs=3), SignallingParticles(blobs()), tmp_path)
    assert raised.value.exit_code == EXIT_INTERRUPTED
    assert ckpt.read_checkpoint(tmp_path / ckpt.LAST)["epoch"] == 1 and len(read_log(tmp_path)) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_train import MODEL, ArrayParticles, blobs, tiny_train_config
from tvae_em.errors import TvaeError
from tvae_em.config import ModelConfig
from tvae_em.train import train
torch.set_num_threads(1)
try:
    train(ModelConfig(**MODEL), tiny_train_config(epochs=50), ArrayParticles(blobs(), delay_s={delay_s}),
          {run_dir!r})
except TvaeError as exc:
    print(f"error: {{exc}}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def wait_for_first_epoch(process, run_dir: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "log.csv").exists():
        running = process.poll() is None if hasattr(process, "poll") else process.is_alive()
        assert running, "training process ended early"
        assert time.monotonic() < deadline, "no epoch completed in time"
        time.sleep(0.02)


def start_script(run_dir: Path, delay_s: float) -> subprocess.Popen:
    code = SCRIPT.format(tests=str(REPO / "tests"), run_dir=str(run_dir), delay_s=delay_s)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_sigterm_to_a_python_process_exits_130_keeping_completed_epochs(tmp_path):
    process = start_script(tmp_path, delay_s=0.05)
    wait_for_first_epoch(process, tmp_path)
    time.sleep(0.15)  # into the next epoch
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert "SIGTERM received in epoch" in stderr and "resume to continue" in stderr
    completed = ckpt.read_checkpoint(tmp_path / ckpt.LAST)["epoch"]
    assert completed >= 1 and len(read_log(tmp_path)) == completed
    assert f"holds epoch {completed}" in stderr
    assert not leftover_temporaries(tmp_path)


@pytest.mark.slow
def test_sigterm_in_the_middle_of_a_long_batch_stops_within_seconds(tmp_path):
    """Issue 16, case 3: the signal used to be acted upon only after the batch in progress, which takes a
    minute here (a read that long; the default generator's backward pass on a busy machine is as slow)."""
    process = start_script(tmp_path, delay_s=60)
    deadline = time.monotonic() + 60
    while not (tmp_path / ckpt.SPLIT).exists():  # written just before the first batch is read
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.02)
    time.sleep(0.2)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=50)
    assert time.monotonic() - signalled < 10
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert "SIGTERM received in epoch 1: stopped, the epoch was dropped; no epoch had completed" in stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([ckpt.LOCK, ckpt.SPLIT, ckpt.CONFIG,
                                                                       ckpt.RUN_LOG])
    last_logged = (tmp_path / ckpt.RUN_LOG).read_text().splitlines()[-1]
    assert last_logged.endswith("error: SIGTERM received in epoch 1: stopped, the epoch was dropped; no epoch had "
                                "completed; resume to continue")


def test_a_signal_takes_effect_during_a_long_backward_pass():
    """Issue 16, case 3: on CPU the autograd engine runs backward on the main thread without running any Python
    code, so a signal handler could only run once the whole backward pass was over (tens of seconds for the
    default generator on a busy machine); the trainer's saved-tensor hooks give it a place between the steps."""
    def deep_product(weights):
        with interruptible_backward():
            h = torch.ones(256, 256)
            for weight in weights:
                h = torch.tanh(h @ weight / 16)
        return h.sum()

    weights = [torch.randn(256, 256, requires_grad=True) for _ in range(200)]
    start = time.perf_counter()
    deep_product(weights).backward()
    uninterrupted_s = time.perf_counter() - start
    for weight in weights:
        weight.grad = None
    timer = threading.Timer(uninterrupted_s / 10, os.kill, (os.getpid(), signal.SIGTERM))
    with stop_on_signals(), pytest.raises(Stop, match="SIGTERM"):
        loss = deep_product(weights)
        timer.start()
        loss.backward()
        timer.join()
    assert sum(weight.grad is not None for weight in weights) < len(weights) // 2  # stopped well before the end


def test_a_run_that_another_process_trains_is_refused_and_left_alone(tmp_path, finished_run):
    """Issue 16, case 4: two processes training into one folder would replace each other's files."""
    run_dir, _, particles = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {path.name: path.read_bytes() for path in copy.iterdir()}
    with open(copy / ckpt.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first process's lock
        with pytest.raises(UsageError, match=f"{copy} is in use by another process"):
            train(None, tiny_train_config(epochs=3), particles, copy, resume=True)
        with pytest.raises(UsageError, match="in use by another process"):
            train(ModelConfig(**MODEL), tiny_train_config(), particles, tmp_path / "run")
    assert {path.name: path.read_bytes() for path in copy.iterdir()} == before


def _train_in_child(run_dir, epochs: int, delay_s: float, env: dict, threads: int) -> None:
    """Body of a training process started with 'spawn': forking after torch's OpenMP pool has run (as it has
    in a full test session) deadlocks the child."""
    os.environ.update(env)
    torch.set_num_threads(threads)  # the parent's: results are bit-identical only with the same reductions
    try:
        train(ModelConfig(**MODEL), tiny_train_config(epochs=epochs, coarse_to_fine=1 / epochs),
              ArrayParticles(blobs(), delay_s), run_dir)
    except TvaeError as exc:
        sys.exit(exc.exit_code)


def started(run_dir: Path, epochs: int = 50, delay_s: float = 0.05, env=None):
    process = multiprocessing.get_context("spawn").Process(target=_train_in_child,
                                                          args=(run_dir, epochs, delay_s, env or {},
                                                                  torch.get_num_threads()))
    process.start()
    return process


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    process = started(killed)
    wait_for_first_epoch(process, killed)
    time.sleep(0.15)
    process.kill()
    process.join()
    assert process.exitcode == -signal.SIGKILL
    assert ckpt.read_checkpoint(killed / ckpt.LAST)["epoch"] in (1, 2)
    config = ModelConfig(**MODEL)
    # the band opens over the first epoch in both: 1/50 of the killed run's plan, 1/3 of the full run's
    resumed = train(config, tiny_train_config(epochs=3, coarse_to_fine=1 / 50), ArrayParticles(blobs()), killed,
                    resume=True)
    full = train(config, tiny_train_config(epochs=3, coarse_to_fine=1 / 3), ArrayParticles(blobs()),
                 tmp_path / "full")
    assert resumed.epochs == full.epochs == 3
    assert_same_parameters(ckpt.read_checkpoint(resumed.last_checkpoint)["model_state"],
                           ckpt.read_checkpoint(full.last_checkpoint)["model_state"])
    assert len(read_log(killed)) == 3 and not leftover_temporaries(killed)


@pytest.mark.slow
def test_torchrun_style_two_cpu_ranks_train_together_and_only_rank_0_writes(tmp_path):
    """Two Gloo ranks configured through torchrun's environment variables (spawned instead of launched)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = [started(tmp_path / f"rank{rank}", epochs=2, delay_s=0.0,
                    env={"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    for process in ranks:
        process.join(timeout=120)
        assert process.exitcode == 0
    rows = read_log(tmp_path / "rank0")
    assert len(rows) == 2 and all(math.isfinite(float(row["val_elbo"])) for row in rows)
    assert ckpt.read_checkpoint(tmp_path / "rank0" / ckpt.LAST)["epoch"] == 2
    assert not (tmp_path / "rank1").exists()


def test_wait_clock_counts_the_time_spent_waiting_for_batches():
    def slow_batches():
        for item in range(4):
            time.sleep(0.05)
            yield item

    clock = _WaitClock(slow_batches())
    items = []
    for item in clock:
        items.append(item)
        time.sleep(0.05)  # the training step: not waiting
    assert items == [0, 1, 2, 3]
    assert 0.2 <= clock.waited < 0.35


# --- resume through the command line, on a STAR file as RELION 3.1 writes it (issue 14) -----------------------

RELION31_STAR = optics_block(
    "opticsGroup1 1 1.060000 300.000000 2.700000 0.100000 4.240000 24 2",
) + """

# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnImageName #3
_rlnMicrographName #4
_rlnOpticsGroup #5
_rlnDefocusU #6
_rlnDefocusV #7
_rlnDefocusAngle #8
{rows}
"""
TINY_CLI_MODEL = ["--rotations", "4", "--encoder-fields", "4", "--encoder-kernel", "9", "--generator-width", "32",
                  "--generator-depth", "1", "--fourier-features", "16"]
# every training option away from its default, so that a resume that fell back on a default would show
RUN_OPTIONS = ["--batch-size", "8", "--lr", "1e-3", "--coarse-to-fine", "0.25", "--seed", "3", "--val-fraction",
               "0.25", "--amp", "off", "--ctf", "none"]


def tvae_em(argv) -> int:
    """Run ``tvae-em argv`` on the CPU as the installed script does; its exit code."""
    from tvae_em.cli import main

    with pytest.raises(SystemExit) as exited:
        main([*argv, "--device", "cpu"])
    return exited.value.code


def messages(capsys) -> list[str]:
    """The stderr lines written since the last call, without progress lines."""
    return message_lines(capsys.readouterr().err)


def folder_bytes(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A 1-epoch run trained by ``tvae-em train`` on the particles of a RELION 3.1 STAR file (full CTF columns)."""
    from tvae_em.io.stack import write_stack

    folder = tmp_path_factory.mktemp("cli_run")
    write_stack(folder / "particles.mrcs", (blobs(24) - 0.1) / 0.2, 4.24)  # about mean 0, std 1 as preprocessed
    rows = "\n".join(f"{100 + i}.000000 {200 + i}.000000 {i + 1:06d}@particles.mrcs MotionCorr/job002/mic1.mrc 1 "
                     f"{15000 + 100 * i:.6f} {14500 + 100 * i:.6f} 12.500000" for i in range(24))
    (folder / "particles.star").write_text(RELION31_STAR.format(rows=rows))
    assert tvae_em(["train", str(folder / "particles.star"), "-o", str(folder / "run"), "--epochs", "1",
                    *TINY_CLI_MODEL, *RUN_OPTIONS]) == 0
    return folder


@pytest.fixture
def cli_copy(cli_run, tmp_path, monkeypatch):
    """A copy of ``cli_run`` in the working folder: particles.star, particles.mrcs, run/."""
    shutil.copytree(cli_run, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_resume_takes_every_option_from_the_run_and_epochs_is_the_new_total(cli_copy, capsys):
    stored = ckpt.read_checkpoint(cli_copy / "run" / ckpt.LAST)
    assert tvae_em(["train", "particles.star", "--resume", "run", "--epochs", "2"]) == 0
    resumed = ckpt.read_checkpoint(cli_copy / "run" / ckpt.LAST)
    assert resumed["epoch"] == 2
    assert resumed["model_config"] == stored["model_config"] and resumed["model_config"]["ctf"] == "none"
    expected = {**stored["train_config"], "epochs": 2}
    assert {key: resumed["train_config"][key] for key in expected} == expected
    assert (expected["batch_size"], expected["lr"], expected["seed"], expected["amp"]) == (8, 1e-3, 3, "off")


def test_resuming_a_finished_run_says_so_and_leaves_it_untouched(cli_copy, capsys):
    before = folder_bytes(cli_copy / "run")
    # without --epochs the run keeps its total (1), not the default recipe's 20; options equal to the run's pass
    for extra in ([], ["--batch-size", "8", "--ctf", "none", "--rotations", "4"]):
        messages(capsys)
        assert tvae_em(["train", "particles.star", "--resume", "run", *extra]) == 0
        assert messages(capsys) == ["run: 1 of 1 epochs are done: nothing to do (give a larger --epochs to train "
                                    "further)"]
    assert folder_bytes(cli_copy / "run") == before


@pytest.mark.parametrize("option, named", [
    (["--lr", "0.01"], "--lr 0.01 (the run's lr: 0.001)"),
    (["--preset", "paper"], "--preset paper (the run's batch size: 8, coarse to fine: 0.25, lr: 0.001)"),
    (["--z-dim", "3"], "--z-dim 3 (the run's z dim: 2)"),
    (["--ctf", "auto"], "--ctf auto (the run's ctf: none)"),
    (["--subpixel"], "--subpixel (the run's subpixel: False)"),
    (["--encoder-pointwise", "shared"], "--encoder-pointwise shared (the run's encoder pointwise: group)"),
    (["--fourier-random-phase"], "--fourier-random-phase (the run's fourier random phase: False)"),
])
def test_resume_refuses_options_that_would_change_the_model_or_the_optimisation(cli_copy, capsys, option, named):
    before = folder_bytes(cli_copy / "run")
    messages(capsys)
    assert tvae_em(["train", "particles.star", "--resume", "run", "--epochs", "3", *option]) == 2
    (line,) = messages(capsys)
    assert line.startswith("error: cannot resume run with ") and named in line and "--epochs" in line
    assert folder_bytes(cli_copy / "run") == before


def test_train_builds_rotation_shared_layers_and_phase_shifted_cosines_when_asked(cli_copy):
    assert tvae_em(["train", "particles.star", "-o", "shared", "--epochs", "1", *TINY_CLI_MODEL, *RUN_OPTIONS,
                    "--encoder-pointwise", "shared", "--fourier-random-phase"]) == 0
    stored = ckpt.read_checkpoint(cli_copy / "shared" / ckpt.LAST)
    assert stored["model_config"]["encoder_pointwise"] == "shared" and stored["model_config"]["fourier_random_phase"]
    state = stored["model_state"]
    assert state["encoder.shared.0.weight"].shape == (4, 4) and "encoder.net.2.weights" not in state
    assert state["generator.fourier_phase"].shape == (16,) and state["generator.coord_layer.weight"].shape == (32, 16)


def test_resume_of_a_run_without_a_completed_epoch_asks_for_a_new_start(cli_copy, capsys):
    (cli_copy / "empty").mkdir()
    messages(capsys)
    assert tvae_em(["train", "particles.star", "--resume", "empty"]) == 2
    assert messages(capsys) == ["error: empty holds no completed epoch, so no settings to resume with: start it "
                                "again with -o empty and its options"]


def checkpoint_with(state: dict, path: Path) -> Path:
    ckpt.save_checkpoint({"model_config": ModelConfig(**MODEL).to_dict(), "train_config": {}, "model_state": state,
                          "epoch": 1}, path)
    return path


def test_checkpoints_keep_a_fingerprint_of_each_filter_basis_instead_of_the_basis(tmp_path):
    model = ckpt.build_model(ModelConfig(**MODEL), seed=3)
    state = ckpt.model_state(model)
    assert not [name for name in state if name.endswith(".sampled_basis")]
    fingerprints = [name for name in state if name.endswith(".sampled_basis_fingerprint")]
    assert len(fingerprints) == 4  # the first layer's and the three 1x1 layers' (escnn shares one among them)
    slim = checkpoint_with(state, tmp_path / "slim.pt")
    full = checkpoint_with(dict(model.state_dict()), tmp_path / "full.pt")  # as checkpoints were before
    assert slim.stat().st_size < 0.7 * full.stat().st_size
    images = torch.from_numpy(blobs(3))
    expected = model.eval().encode(images)
    for path in (slim, full):  # the bases rebuilt with the model, or read from an older checkpoint
        loaded, _ = ckpt.load_model(path, for_inference=False)
        for name, value in vars(loaded.encode(images)).items():
            assert torch.equal(value, getattr(expected, name)), (path.name, name)


def test_a_filter_basis_unlike_the_one_trained_with_is_refused(tmp_path):
    state = ckpt.model_state(ckpt.build_model(ModelConfig(**MODEL), seed=3))
    name = next(name for name in state if name.endswith(".sampled_basis_fingerprint"))
    state[name] = state[name] * torch.tensor([1.0, 1.01, 1.0], dtype=torch.float64)  # another escnn's sampling
    path = checkpoint_with(state, tmp_path / "other_escnn.pt")
    with pytest.raises(InputError, match=f"^{path}: escnn .* samples the encoder's filter bases differently"):
        ckpt.load_model(path, for_inference=False)
