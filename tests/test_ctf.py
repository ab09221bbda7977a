"""The CTF: values against an independent computation, RELION's astigmatism convention, the STAR columns it is
read from (RELION 3.1 and 3.0 layouts), and its place in the model and in training."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tvae_em import ctf, simulate
from tvae_em.checkpoint import load_model
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.ctf import ctf_mode
from tvae_em.errors import InputError, UsageError
from tvae_em.io.particles import ParticleTable
from tvae_em.io.relion import CTF_COLUMNS
from tvae_em.io.stack import ArrayParticles, open_particles, write_stack
from tvae_em.io.star import new_relion31_star, read_star, write_star
from tvae_em.model import TargetVAE
from tvae_em.train import train

torch.set_num_threads(1)


def params(defocus_u=15000.0, defocus_v=15000.0, angle=0.0, voltage=300.0, cs=2.7, q0=0.1, phase=0.0,
           bfactor=0.0, scale=1.0, apix=1.0) -> torch.Tensor:
    return torch.tensor([[defocus_u, defocus_v, angle, voltage, cs, q0, phase, bfactor, scale, apix]],
                        dtype=torch.float64)


def at(p: torch.Tensor, s: np.ndarray, direction_rad: float = 0.0) -> np.ndarray:
    """CTF along one direction at spatial frequencies s (1/Å, pixel size 1 Å)."""
    u = torch.from_numpy(np.asarray(s, np.float64))
    return ctf.evaluate(p, u * math.cos(direction_rad), u * math.sin(direction_rad))[0].numpy()


def test_electron_wavelength_matches_the_tabulated_values():
    assert ctf.electron_wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert ctf.electron_wavelength(200.0) == pytest.approx(0.025079, abs=2e-6)


def test_values_match_an_independent_computation_and_the_analytic_zeros():
    defocus, voltage, cs_mm, q0 = 18000.0, 300.0, 2.7, 0.07
    p = params(defocus, defocus, voltage=voltage, cs=cs_mm, q0=q0)
    # independent: chi(s) = pi lambda dz s^2 - pi/2 Cs lambda^3 s^4, CTF = sin(chi + arcsin(q0)) for no phase plate
    volts = voltage * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1 + 0.978466e-6 * volts))
    s = np.linspace(0.0, 0.3, 301)
    chi = math.pi * lam * defocus * s ** 2 - 0.5 * math.pi * cs_mm * 1e7 * lam ** 3 * s ** 4
    np.testing.assert_allclose(at(p, s), np.sin(chi + math.asin(q0)), atol=1e-9)
    # zeros: chi(s) + asin(q0) = k pi, a quadratic in s^2, solved without the module
    a, b = -0.5 * math.pi * cs_mm * 1e7 * lam ** 3, math.pi * lam * defocus
    for k in (1, 2, 3, 5):
        s2 = (-b + math.sqrt(b * b - 4 * a * (math.asin(q0) - k * math.pi))) / (2 * a)
        assert abs(at(p, [math.sqrt(s2)])[0]) < 1e-6, k
    assert at(p, [0.0])[0] == pytest.approx(q0)  # positive at the origin, as RELION's


def test_phase_shift_bfactor_and_scale():
    s = np.linspace(0.01, 0.25, 50)
    plain = at(params(), s)
    np.testing.assert_allclose(at(params(bfactor=80.0, scale=0.5), s), 0.5 * np.exp(-80.0 * s ** 2 / 4) * plain,
                               atol=1e-12)
    # a 90 degree phase plate turns sin into cos: at s = 0 the CTF is ~1 instead of ~q0
    assert at(params(phase=90.0, q0=0.0), [0.0])[0] == pytest.approx(1.0)


def test_defocus_u_lies_along_the_angle_and_swapping_u_v_equals_turning_by_90_degrees():
    s = np.linspace(0.0, 0.2, 81)
    astigmatic = params(defocus_u=20000.0, defocus_v=12000.0, angle=30.0)
    swapped = params(defocus_u=12000.0, defocus_v=20000.0, angle=120.0)
    for direction in np.radians([0.0, 30.0, 75.0, 150.0]):
        np.testing.assert_allclose(at(astigmatic, s, direction), at(swapped, s, direction), atol=1e-12)
    # along the angle (from x towards y) the CTF is that of defocus U, across it that of V
    np.testing.assert_allclose(at(astigmatic, s, math.radians(30.0)), at(params(20000.0, 20000.0), s), atol=1e-12)
    np.testing.assert_allclose(at(astigmatic, s, math.radians(120.0)), at(params(12000.0, 12000.0), s), atol=1e-12)


def test_rfft_frequencies_put_x_on_columns_and_y_on_rows():
    u_x, u_y = ctf.rfft_frequencies(8)
    assert u_x.shape == u_y.shape == (8, 5)
    assert u_x[0, 1] == 1 / 8 and u_y[0, 1] == 0 and u_y[1, 0] == 1 / 8 and u_y[7, 0] == -1 / 8
    # a CTF with the astigmatism along y filters a wave along the rows as its V... and along the columns as U
    p = params(defocus_u=20000.0, defocus_v=10000.0, angle=90.0, apix=2.0)
    values = ctf.transfer(p, 8, "full")[0]
    along_y = at(params(20000.0, 20000.0), [1 / 16])[0]
    along_x = at(params(10000.0, 10000.0), [1 / 16])[0]
    assert values[1, 0].item() == pytest.approx(along_y, abs=1e-6)
    assert values[0, 1].item() == pytest.approx(along_x, abs=1e-6)
    assert torch.equal(ctf.transfer(p, 8, "flipped"), values.abs()[None])


# --- the STAR columns -----------------------------------------------------------------------------------------

def _star(tmp_path, particle_columns: dict, optics_columns: dict, n: int = 3):
    images = np.zeros((n, 16, 16), np.float32)
    write_stack(tmp_path / "p.mrcs", images, 1.5)
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["a", "b"],
                           "rlnImagePixelSize": [1.5, 1.5], "rlnImageSize": [16, 16],
                           "rlnImageDimensionality": [2, 2], **optics_columns})
    particles = pd.DataFrame({"rlnImageName": [f"{i}@p.mrcs" for i in range(1, n + 1)],
                              "rlnOpticsGroup": [1, 2, 2][:n], **particle_columns})
    path = tmp_path / "particles.star"
    write_star(path, new_relion31_star(optics, particles))
    return path


def test_parameters_come_from_particle_rows_and_optics_groups(tmp_path):
    path = _star(tmp_path, {"rlnDefocusU": [1e4, 2e4, 3e4], "rlnDefocusV": [9e3, 1.9e4, 2.9e4],
                            "rlnDefocusAngle": [10.0, 20.0, 30.0], "rlnPhaseShift": [0.0, 45.0, 90.0]},
                 {"rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 2.0],
                  "rlnAmplitudeContrast": [0.1, 0.07]})
    particles = open_particles(path)
    values = particles.ctf
    names = [name for name, _, _ in CTF_COLUMNS] + ["pixel_size"]
    table = pd.DataFrame(values, columns=names)
    assert table["defocus_u"].tolist() == [1e4, 2e4, 3e4] and table["phase_shift_deg"].tolist() == [0, 45, 90]
    assert table["voltage_kv"].tolist() == [300, 200, 200] and table["cs_mm"].tolist() == [2.7, 2.0, 2.0]
    assert table["bfactor"].tolist() == [0, 0, 0] and table["scale"].tolist() == [1, 1, 1]  # defaults
    assert table["pixel_size"].tolist() == [1.5, 1.5, 1.5]
    assert not particles.ctf_flipped


def test_relion30_rows_carry_the_optics_values_themselves(tmp_path):
    write_stack(tmp_path / "p.mrcs", np.zeros((2, 16, 16), np.float32), 1.0)
    lines = ["data_", "loop_", "_rlnImageName #1", "_rlnDefocusU #2", "_rlnDefocusV #3", "_rlnDefocusAngle #4",
             "_rlnVoltage #5", "_rlnSphericalAberration #6", "_rlnAmplitudeContrast #7", "_rlnDetectorPixelSize #8",
             "_rlnMagnification #9",
             "1@p.mrcs 15000 14000 45 300 2.7 0.1 5.0 50000",
             "2@p.mrcs 21000 20500 10 300 2.7 0.1 5.0 50000"]
    (tmp_path / "old.star").write_text("\n".join(lines) + "\n")
    values = open_particles(tmp_path / "old.star").ctf
    np.testing.assert_allclose(values[:, :6], [[15000, 14000, 45, 300, 2.7, 0.1], [21000, 20500, 10, 300, 2.7, 0.1]])
    np.testing.assert_allclose(values[:, -1], 1.0)  # 10000 * 5 um / 50000


def test_missing_or_impossible_ctf_values_name_the_file_and_the_column(tmp_path):
    optics = {"rlnVoltage": [300.0, 300.0], "rlnAmplitudeContrast": [0.1, 0.1]}
    path = _star(tmp_path, {"rlnDefocusU": [1e4] * 3, "rlnDefocusV": [1e4] * 3, "rlnDefocusAngle": [0.0] * 3},
                 optics)
    with pytest.raises(InputError, match=f"{path}: no _rlnSphericalAberration column"):
        _ = open_particles(path).ctf
    table = ParticleTable.from_star(read_star(path), 16, None)
    star = table.star.replace("optics", table.star["optics"].assign(rlnSphericalAberration="2.7",
                                                                   rlnAmplitudeContrast="1.5"))
    with pytest.raises(InputError, match="particle row 1: CTF values out of range"):
        _ = dataclasses.replace(table, star=star).ctf


def test_ctf_requests_resolve_from_the_particles(capsys):
    with_defocus = ArrayParticles(np.zeros((2, 8, 8)), ctf=params().numpy().repeat(2, 0))
    without = ArrayParticles(np.zeros((2, 8, 8)))
    flipped = ArrayParticles(np.zeros((2, 8, 8)), ctf=params().numpy().repeat(2, 0), ctf_flipped=True)
    assert ctf_mode("auto", with_defocus) == ctf_mode("on", with_defocus) == "full"
    assert ctf_mode("auto", flipped) == "flipped"
    assert ctf_mode("auto", without) == ctf_mode("none", without) == "none"
    assert capsys.readouterr().err == ""
    assert ctf_mode("none", with_defocus) == "none"
    assert "neither modelled (--ctf none) nor corrected" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--ctf on: the particles carry no defocus values"):
        ctf_mode("on", without)



def test_an_incomplete_ctf_is_refused_only_where_it_would_be_modelled(tmp_path, capsys):
    """Defocus values without the rest of a CTF (no spherical aberration): --ctf none trains on them, with the
    note that the latents may follow defocus; auto and on name the missing column."""
    path = _star(tmp_path, {"rlnDefocusU": [1e4] * 3}, {"rlnVoltage": [300.0, 300.0]})
    particles = open_particles(path)
    capsys.readouterr()
    assert ctf_mode("none", particles) == "none"
    assert "neither modelled (--ctf none) nor corrected" in capsys.readouterr().err
    for request in ("auto", "on"):
        with pytest.raises(InputError, match=f"{path}: no _rlnDefocusV column"):
            ctf_mode(request, particles)

# --- the model and training -----------------------------------------------------------------------------------

TINY = dict(image_size=16, rotations=4, encoder_fields=2, generator_width=8, generator_depth=2, fourier_features=8,
            likelihood="gaussian")


def test_elbo_multiplies_the_posed_image_by_the_transfer_function():
    torch.manual_seed(0)
    plain = TargetVAE(ModelConfig(**TINY))
    with_ctf = TargetVAE(ModelConfig(**TINY, ctf="full"))
    with_ctf.load_state_dict(plain.state_dict())
    images = torch.randn(3, 16, 16)
    ones = torch.ones(3, 16, 9)
    same = [model.elbo(images, torch.Generator().manual_seed(1), *extra).elbo
            for model, extra in ((plain, ()), (with_ctf, (ones,)))]
    assert torch.allclose(*same, rtol=1e-5)
    damped = with_ctf.elbo(images, torch.Generator().manual_seed(1), 0.5 * ones).elbo
    assert not torch.isclose(damped, same[0])
    with pytest.raises(ValueError, match="needs each particle's transfer function"):
        with_ctf.elbo(images)
    with pytest.raises(ValueError, match="gaussian likelihood"):
        ModelConfig(**{**TINY, "likelihood": "bernoulli"}, ctf="full")


def test_training_with_a_ctf_records_the_mode_and_refuses_a_mismatch(tmp_path):
    data = simulate.simulate_particles(24, box=16, n_objects=1, seed=0, apix=4.0, defocus_um=(1.0, 2.5))
    particles = ArrayParticles(data["images"] / data["images"].std(), ctf=data["ctf"])
    config = TrainConfig(epochs=1, batch_size=8, val_fraction=0.25, num_workers=0, progress=False)
    train(ModelConfig(**TINY, ctf="full"), config, particles, tmp_path / "run")
    assert load_model(tmp_path / "run")[1].ctf == "full"
    with pytest.raises(UsageError, match="no defocus values"):
        train(ModelConfig(**TINY, ctf="full"), config, ArrayParticles(data["images"]), tmp_path / "other")
    flipped = ArrayParticles(data["images"], ctf=data["ctf"], ctf_flipped=True)
    with pytest.raises(UsageError, match="the full CTF but the images are phase flipped"):
        train(ModelConfig(**TINY, ctf="full"), config, flipped, tmp_path / "third")


def test_simulated_particles_are_seen_through_their_ctf(tmp_path):
    data = simulate.simulate_particles(6, box=32, n_objects=1, seed=1, apix=3.0, defocus_um=(1.0, 2.5), snr=1e6)
    assert data["ctf"].shape == (6, ctf.N_COLUMNS)
    assert np.all((data["ctf"][:, 0] >= 1e4) & (data["ctf"][:, 0] <= 2.5e4))
    assert np.all((data["ctf"][:, 0] - data["ctf"][:, 1] >= 0) & (data["ctf"][:, 0] - data["ctf"][:, 1] <= 600))
    posed = simulate.render_pose(data["canonical"], data["theta"], data["t_model"])
    transfer = ctf.transfer(torch.from_numpy(data["ctf"]), 32, "full").numpy()
    expected = np.fft.irfft2(np.fft.rfft2(posed) * transfer, s=(32, 32))
    np.testing.assert_allclose(data["clean"], expected, atol=1e-4)
    star = simulate.write_simulated(tmp_path, "ctf", data, 3.0)
    np.testing.assert_allclose(open_particles(star).ctf, data["ctf"], rtol=1e-6)
    assert open_particles(simulate.canonical_star_path(star)).ctf is None


def test_preprocess_phase_flip_multiplies_by_the_sign_of_the_ctf_and_says_so(tmp_path):
    from tvae_em.preprocess import fourier_crop, preprocess_star

    data = simulate.simulate_particles(5, box=32, n_objects=1, seed=2, apix=2.0, defocus_um=(1.0, 2.5))
    star = simulate.write_simulated(tmp_path / "sim", "p", data, 2.0)
    out = preprocess_star(star, tmp_path / "prep", box=16, normalize="none", phase_flip=True)
    flipped = open_particles(out)
    assert flipped.ctf_flipped and ctf_mode("auto", flipped) == "flipped"
    expected_params = data["ctf"].copy()
    expected_params[:, -1] = 4.0  # the cropped images' pixel size
    np.testing.assert_allclose(flipped.ctf, expected_params, rtol=1e-6)
    expected = ctf.phase_flip(fourier_crop(data["images"], 16), expected_params)
    np.testing.assert_allclose(flipped.read(np.arange(5)), expected, atol=1e-4)
    # the sign is right: flipping the CTF-modulated clean image leaves |CTF| times the object's spectrum
    cropped_clean = fourier_crop(data["clean"], 16)
    spectrum = np.fft.rfft2(ctf.phase_flip(cropped_clean, expected_params).astype(np.float64))
    unflipped = np.fft.rfft2(fourier_crop(simulate.render_pose(data["canonical"], data["theta"], data["t_model"]),
                                          16).astype(np.float64))
    magnitude = np.abs(ctf.transfer(torch.from_numpy(expected_params), 16, "full").numpy())
    below_nyquist = (slice(None), np.r_[0:8, 9:16], slice(0, 8))  # cropping leaves Nyquist half of the ring
    np.testing.assert_allclose(spectrum[below_nyquist], (unflipped * magnitude)[below_nyquist],
                               atol=1e-3 * np.abs(unflipped).max())
    with pytest.raises(UsageError, match="phase flipped already"):
        preprocess_star(out, tmp_path / "again", phase_flip=True)
    with pytest.raises(UsageError, match="no defocus values"):
        preprocess_star(simulate.canonical_star_path(star), tmp_path / "none", phase_flip=True)
