"""In-plane poses: conversion between the model's (theta, t) and RELION's (psi, origin), and resampling.

Frames (fixed project-wide, see the common brief):

* RELION pixel frame: pixel (row, col) of an N x N box sits at x_px = col - N//2, y_px = row - N//2.
* Model frame: x = x_px / (N/2), y = y_px / (N/2), so the pixel centres span [-1, 1).
* R(a) = [[cos a, -sin a], [sin a, cos a]] acting on (x, y) column vectors.

Model forward model. A canonical object F, centred on the frame origin, observed with pose (theta, t) gives

    I(x) = F(R(theta) (x - t)),                                                     (1)

i.e. the object centre lies at x = t and the object appears rotated by -theta.  The generator realises
(1) by evaluating F at x' = R(theta) (x - t); the paper's x' = R(theta) x + t (Nasiri & Bepler 2022,
eq. 2) is the same family with t rotated and negated, and the project fixes (1) so that t is where the
object is.

RELION alignment. RELION aligns an image by first shifting it by +origin, J(x) = I(x - o), and then
rotating it by +psi, K(x) = J(R(psi)^T x).  Substituting (1):

    K(x) = F(R(theta) (R(psi)^T x - o - t)).

K equals F for every x exactly when psi = theta and o = -t (both in the same units), so

    psi_deg          = degrees(theta)             (wrapped to (-180, 180])
    origin_px        = -t * (N / 2)
    origin_angst     = origin_px * pixel_size
    particle centre  = (N//2 - originX / apix, N//2 - originY / apix) in (col, row).

Every conversion below is vectorised over numpy arrays of particles, and every rotation of the project's numpy
code is ``rotation_matrix`` / ``rotate``, so that the sign convention of R is written once.
"""

import numpy as np
from scipy import ndimage


def rotation_matrix(angle_rad) -> np.ndarray:
    """R(a) = [[cos a, -sin a], [sin a, cos a]]: (2, 2) for one angle, (..., 2, 2) for an array of them."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.stack([np.stack([c, -s], axis=-1), np.stack([s, c], axis=-1)], axis=-2)


def rotate(points_xy, angle_rad) -> np.ndarray:
    """R(a) p for points p (..., 2) as (x, y): by one angle, or by one angle per point (angles (...,))."""
    return np.einsum("...ij,...j->...i", rotation_matrix(angle_rad), np.asarray(points_xy, dtype=np.float64))


def wrap_degrees(angle_deg):
    """Map angles to (-180, 180], the range RELION writes for rlnAnglePsi."""
    wrapped = np.mod(np.asarray(angle_deg, dtype=np.float64) + 180.0, 360.0) - 180.0
    return np.where(wrapped == -180.0, 180.0, wrapped)


def model_to_relion(theta_rad, t_model, box: int, apix):
    """Model pose -> RELION pose.

    theta_rad: (n,) rotation in radians; t_model: (n, 2) translation (tx, ty) in model units;
    box: image size N in pixels; apix: pixel size in Angstrom (scalar or (n,)).
    Returns (psi_deg, origin_x_angst, origin_y_angst), each (n,).
    """
    t_model = np.asarray(t_model, dtype=np.float64).reshape(-1, 2)
    origin_px = -t_model * (box / 2.0)
    apix = np.asarray(apix, dtype=np.float64)
    return wrap_degrees(np.degrees(theta_rad)), origin_px[:, 0] * apix, origin_px[:, 1] * apix


def relion_to_model(psi_deg, origin_x_angst, origin_y_angst, box: int, apix):
    """RELION pose -> model pose: the exact inverse of :func:`model_to_relion`.

    Returns (theta_rad (n,) in (-pi, pi], t_model (n, 2)).
    """
    apix = np.asarray(apix, dtype=np.float64)
    origin_px = np.stack([np.asarray(origin_x_angst, np.float64) / apix,
                          np.asarray(origin_y_angst, np.float64) / apix], axis=-1).reshape(-1, 2)
    theta_rad = np.radians(wrap_degrees(psi_deg)).reshape(-1)
    return theta_rad, -origin_px / (box / 2.0)


def _resample(image: np.ndarray, matrix_xy: np.ndarray, offset_xy: np.ndarray) -> np.ndarray:
    """Bilinear resampling out(x) = image(matrix_xy @ x + offset_xy), x in the RELION pixel frame.

    scipy works on array indices (row, col) = P (x, y) + c with P the axis swap and c = N//2, hence
    matrix = P A P and offset = c - P A P c + P b.
    """
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    centre = np.array(image.shape, dtype=np.float64) // 2
    matrix = swap @ matrix_xy @ swap
    offset = centre - matrix @ centre + swap @ offset_xy
    return ndimage.affine_transform(image.astype(np.float32, copy=False), matrix, offset=offset, order=1,
                                    mode="constant", cval=0.0)


def apply_pose(canonical: np.ndarray, theta_rad, t_model) -> np.ndarray:
    """Forward model (1): image of ``canonical`` with pose (theta, t), bilinear, zero outside.

    canonical: (N, N) with scalar theta and t of shape (2,), or (n, N, N) with theta (n,) and t (n, 2).
    """
    canonical = np.asarray(canonical)
    if canonical.ndim == 3:
        thetas, shifts = np.ravel(theta_rad), np.asarray(t_model, np.float64).reshape(-1, 2)
        poses = zip(canonical, thetas, shifts, strict=True)
        return np.stack([apply_pose(image, theta, t) for image, theta, t in poses])
    t_px = np.asarray(t_model, dtype=np.float64).reshape(2) * (canonical.shape[-1] / 2.0)
    rot = rotation_matrix(float(theta_rad))
    return _resample(canonical, rot, -rot @ t_px)


def align_image(image: np.ndarray, psi_deg: float, origin_x_angst: float, origin_y_angst: float,
                apix: float) -> np.ndarray:
    """RELION alignment of one (N, N) image: shift by +origin, then rotate by +psi (bilinear, zero outside).

    Composed into one resampling, K(x) = I(R(psi)^T x - o), so the image is interpolated only once.
    """
    origin_px = np.array([origin_x_angst, origin_y_angst], dtype=np.float64) / apix
    return _resample(np.asarray(image), rotation_matrix(np.radians(psi_deg)).T, -origin_px)
