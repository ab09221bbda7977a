"""Shared fixtures: small MRC stacks written with mrcfile, independent of the code under test."""

import mrcfile
import numpy as np
import pytest


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
