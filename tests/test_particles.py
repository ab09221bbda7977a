"""The particle table: opening particles parses each STAR column into numbers once, whatever is asked of them."""

import collections
import sys

import numpy as np
import pandas as pd
import pytest

from tvae_em.io import star as star_module
from tvae_em.io.relion import CTF_COLUMNS, PHASE_FLIPPED
from tvae_em.io.stack import open_particles
from tvae_em.io.star import write_star

# RELION 3.0: optics on every row, two optics groups (300 and 200 kV), origins in pixels.
STAR_30 = """
data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
_rlnMagnification #8
_rlnDetectorPixelSize #9
_rlnOriginX #10
_rlnOriginY #11
000001@stack.mrcs 10000 11000 5 300 2.7 0.1 100000 14 1.0 -2.0
000002@stack.mrcs 20000 21000 15 200 2.7 0.1 100000 14 0.5 0.0
000003@stack.mrcs 30000 31000 25 300 2.7 0.1 100000 14 0.0 3.0
000004@stack.mrcs 40000 41000 35 200 2.7 0.1 100000 14 -1.0 1.5
"""


@pytest.fixture
def conversions(monkeypatch):
    """How often each (block, label) is converted to numbers, by ``star.numeric_column`` wherever it is imported."""
    counts = collections.Counter()
    real = star_module.numeric_column

    def counting(star, block, label):
        counts[(block, label)] += 1
        return real(star, block, label)

    for module in list(sys.modules.values()):
        if module.__name__.startswith("tvae_em") and getattr(module, "numeric_column", None) is real:
            monkeypatch.setattr(module, "numeric_column", counting)
    return counts


def everything(particles) -> dict:
    """What commands ask of opened particles."""
    return {"pixel_sizes": particles.pixel_sizes, "ctf": particles.ctf, "ctf_flipped": particles.ctf_flipped,
            "again": (particles.ctf, particles.ctf_flipped)}


def assert_parsed_once(conversions):
    assert conversions, "nothing was converted: the count does not see the conversions"
    twice = {key: count for key, count in conversions.items() if count > 1}
    assert not twice, f"columns converted more than once: {twice}"


def test_a_relion30_star_is_parsed_once(tmp_path, make_stack, conversions):
    make_stack("stack.mrcs", np.zeros((4, 8, 8), np.float32))
    (tmp_path / "in30.star").write_text(STAR_30)
    with open_particles(tmp_path / "in30.star") as particles:
        seen = everything(particles)
    assert_parsed_once(conversions)
    np.testing.assert_allclose(seen["pixel_sizes"], 1.4)
    ctf = pd.DataFrame(seen["ctf"], columns=[label for _, label, _ in CTF_COLUMNS] + ["pixel_size"])
    assert ctf["rlnDefocusU"].tolist() == [1e4, 2e4, 3e4, 4e4] and ctf["rlnDefocusAngle"].tolist() == [5, 15, 25, 35]
    assert ctf["rlnVoltage"].tolist() == [300, 200, 300, 200] and ctf["rlnCtfScalefactor"].tolist() == [1] * 4
    assert not seen["ctf_flipped"]
    assert particles.table["optics"]["rlnOpticsGroup"].tolist() == ["1", "2"]
    assert particles.table["particles"]["rlnOriginYAngst"].tolist() == ["-2.800000", "0.000000", "4.200000",
                                                                       "2.100000"]


def test_a_relion31_star_and_its_subsets_are_parsed_once(tmp_path, make_stack, conversions):
    make_stack("stack.mrcs", np.zeros((4, 8, 8), np.float32))
    (tmp_path / "in30.star").write_text(STAR_30)
    with open_particles(tmp_path / "in30.star") as particles:
        flipped = particles.table.replace("optics", particles.table["optics"].assign(**{PHASE_FLIPPED: ["0", "1"]}))
    write_star(tmp_path / "in31.star", flipped)
    conversions.clear()
    with open_particles(tmp_path / "in31.star") as particles:
        whole = everything(particles)
    assert_parsed_once(conversions)
    assert whole["ctf_flipped"] and whole["ctf"].shape == (4, len(CTF_COLUMNS) + 1)

    conversions.clear()
    with open_particles(tmp_path / "in31.star").subset([0, 2]) as particles:
        chosen = everything(particles)
    assert_parsed_once(conversions)
    np.testing.assert_array_equal(chosen["ctf"], whole["ctf"][[0, 2]])
    assert not chosen["ctf_flipped"]  # both chosen particles are in optics group 1, not flipped
