"""Inference without escnn: a checkpoint keeps the exported encoder, from which ``load_model`` builds a plain-torch
encoder that computes what escnn's computes; ``embed`` and ``pose`` then run where escnn cannot be imported, and
what needs escnn (training, checkpoints from before the export) says so in one line."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import BOX, TINY, save_run

from tvae_em import checkpoint, infer
from tvae_em.config import ModelConfig
from tvae_em.device import torch_threads
from tvae_em.errors import InputError, UsageError
from tvae_em.io.stack import write_stack
from tvae_em.io.star import new_relion31_star, write_star
from tvae_em.model.plain_encoder import PlainEncoder
from tvae_em.model.vae import EscnnMissing

REPO = Path(__file__).resolve().parents[1]
# escnn and the packages only it needs; the blocker makes importing any of them fail, and records every attempt
# (caught ones included) in the file ATTEMPTS of the working directory when the process ends
ESCNN_MODULES = ("escnn", "py3nj", "lie_learn")
ATTEMPTS = "escnn_imports.txt"
BLOCKER = f"""
import atexit
import sys

class BlockEscnn:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {ESCNN_MODULES!r}:
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}")

sys.meta_path.insert(0, BlockEscnn())
atexit.register(lambda: open({ATTEMPTS!r}, "w").write(" ".join(BlockEscnn.attempts)))
"""
# the tiny model is untrained: every command rightly warns that it cannot place the particles
pytestmark = pytest.mark.filterwarnings("ignore:most poses are uncertain")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def assert_same_estimates(a, b):
    for name, value in vars(a).items():
        assert torch.equal(value, getattr(b, name)), name


@pytest.mark.parametrize("overrides", [dict(rotations=4),  # odd kernel (11 px)
                                       dict(rotations=8, encoder_kernel=10, subpixel=True),
                                       dict(rotations=8, encoder_pointwise="shared", subpixel=True)])
def test_plain_encoder_computes_what_the_escnn_encoder_computes(tmp_path, overrides):
    run = save_run(tmp_path / "run", **overrides)
    escnn_model, _ = checkpoint.load_model(run, for_inference=False)
    plain_model, config = checkpoint.load_model(run)
    assert isinstance(plain_model.encoder, PlainEncoder) and config == ModelConfig(**{**TINY, **overrides})
    images = torch.randn(6, BOX, BOX, generator=torch.Generator().manual_seed(1))
    reference_model = checkpoint.build_model(replace(config, kernels="reference")).eval()  # escnn's own modules
    reference_model.load_state_dict(escnn_model.state_dict())
    reference = reference_model.encode(images)
    escnn_model.encoder.export()  # what inference ran before the export was kept
    exported = escnn_model.encode(images)
    plain = plain_model.encode(images)
    assert_same_estimates(plain, exported)
    for name, value in vars(reference).items():
        assert torch.allclose(value, getattr(plain, name), rtol=1e-5, atol=1e-5), name
    z = torch.randn(3, TINY["z_dim"])
    assert torch.equal(plain_model.decode(z), escnn_model.decode(z))


def write_particles(folder: Path) -> Path:
    images = np.random.default_rng(0).normal(size=(6, BOX, BOX)).astype(np.float32)
    write_stack(folder / "particles.mrcs", images, 1.5)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnImagePixelSize": [1.5],
                           "rlnImageSize": [BOX], "rlnImageDimensionality": [2], "rlnVoltage": [300.0]})
    particles = pd.DataFrame({"rlnImageName": [f"{i:06d}@particles.mrcs" for i in range(1, 7)],
                              "rlnOpticsGroup": [1] * 6})
    star = folder / "particles.star"
    write_star(star, new_relion31_star(optics, particles))
    return star


def run_without_escnn(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """``python -m tvae_em.cli ARGS`` in ``tmp_path``, in a process where escnn, py3nj and lie_learn cannot be
    imported."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tvae_em.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["embed", "pose"])
def test_embed_and_pose_run_without_escnn_and_write_what_the_escnn_path_writes(tmp_path, command):
    star = write_particles(tmp_path)
    done = run_without_escnn(tmp_path, command, str(save_run(tmp_path / "run")), str(star), "-o", "plain.star",
                             "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / ATTEMPTS).read_text() == ""  # the blocker was there, and nothing tried to import escnn
    # the same weights in a checkpoint from before the export, read through escnn in this process
    getattr(infer, command)(save_run(tmp_path / "old", export=False), star, tmp_path / "escnn.star", batch_size=4)
    assert (tmp_path / "plain.star").read_bytes() == (tmp_path / "escnn.star").read_bytes()


def test_checkpoints_from_before_shared_layers_hold_group_convolutions(tmp_path):
    run = save_run(tmp_path / "run")
    stored = checkpoint.read_checkpoint(run / checkpoint.BEST)
    del stored["model_config"]["encoder_pointwise"]
    checkpoint.save_checkpoint(stored, run / checkpoint.BEST)
    model, config = checkpoint.load_model(run)
    assert config.encoder_pointwise == "group" and model.encoder.weight1.shape == (16, 16, 1, 1)  # fields x r


def test_resaving_an_old_checkpoint_adds_the_export(tmp_path):
    old, current = save_run(tmp_path / "old", export=False), save_run(tmp_path / "current")
    checkpoint.main([str(old)])
    resaved = checkpoint.read_checkpoint(old / checkpoint.BEST)[checkpoint.ENCODER_EXPORT]
    written = checkpoint.read_checkpoint(current / checkpoint.BEST)[checkpoint.ENCODER_EXPORT]
    assert resaved.keys() == written.keys()
    assert all(torch.equal(resaved[name], written[name]) for name in written)


@pytest.fixture
def old_run(tmp_path):
    return save_run(tmp_path / "run", export=False)


@pytest.fixture
def escnn_missing(monkeypatch):
    """escnn cannot be imported, nor the encoder module built on it (already imported by this process)."""
    for name in ("escnn", "tvae_em.model.encoder"):
        monkeypatch.setitem(sys.modules, name, None)


def test_training_and_old_checkpoints_say_that_they_need_escnn(old_run, escnn_missing):
    with pytest.raises(EscnnMissing, match=r"^the trainable encoder needs escnn, which cannot be imported here") as err:
        checkpoint.build_model(ModelConfig(**TINY))
    assert isinstance(err.value, UsageError)  # one line and exit code 2 from the CLI
    with pytest.raises(InputError) as err:
        checkpoint.load_model(old_run)
    assert str(err.value).startswith(f"{old_run / checkpoint.BEST}: this checkpoint predates the exported encoder")
    assert "install escnn, or re-save it" in str(err.value) and "\n" not in str(err.value)


def test_training_on_planar_rotations_never_needs_py3nj(monkeypatch):
    """escnn uses py3nj only for SO(3) Clebsch-Gordan coefficients (escnn/group/groups/so3group.py), which is why
    bin/install may leave it, and the Fortran compiler it needs, out: building and training the encoder (on
    geometries no other test builds, so that escnn's caches hold none of their bases) computes none of them and
    creates no SO(3) or O(3) group."""
    from escnn.group import O3, SO3
    from escnn.group.groups import so3group

    def forbidden(*args, **kwargs):
        raise AssertionError("SO(3) or O(3) reached")

    monkeypatch.setattr(so3group, "py3nj", None)
    monkeypatch.setattr(so3group, "_clebsh_gordan_tensor_so3", forbidden)
    for group in (SO3, O3):
        monkeypatch.setattr(group, "__init__", forbidden)
    for overrides in (dict(rotations=6, encoder_kernel=7), dict(rotations=12, encoder_kernel=8, subpixel=True)):
        model = checkpoint.build_model(ModelConfig(**{**TINY, **overrides}))
        model.elbo(torch.rand(4, BOX, BOX)).loss.backward()
        assert all(parameter.grad is not None for parameter in model.encoder.parameters())
