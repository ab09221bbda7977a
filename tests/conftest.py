"""Shared fixtures: small MRC stacks written with mrcfile, independent of the code under test, and the real
MNIST test digits of the workplace."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from tvae_em.io.mnist import has_mnist

# ../shared/data/mnist beside the repository (.ci/run says loudly when it is missing)
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir():
    """The folder of the real MNIST t10k digits; the test is skipped, with the path in the reason, without it."""
    if not has_mnist(SHARED_MNIST, "t10k"):
        pytest.skip(f"MNIST t10k digits not found in {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture
def make_stack(tmp_path):
    """make_stack(relative_path, images (n, ny, nx) or (ny, nx), apix=1.0) -> Path of a new MRC file."""

    def make(relative_path, images, apix=1.0):
        path = tmp_path / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(np.asarray(images))
            if np.asarray(images).ndim == 3:
                mrc.set_image_stack()
            mrc.voxel_size = apix
        return path

    return make
