"""What the encoder's posterior q(t, r | y) (paper section 3.2) says about an inferred pose: whether it is
confident (``confidence_report``) and which cyclic symmetry the rotation mass q(r | y) suggests
(``symmetry_hint``). ``tvae-em pose`` writes both per particle; ``embed`` reports the confidence too.
"""

import warnings

import numpy as np

CONFIDENT_MASS = 0.5  # a pose is confident when this much of q(t, r | y) lies within 1 px and 1 bin of it


def confidence_report(local_mass) -> str:
    """One line counting the particles whose pose is uncertain; also a warning when they are the majority,
    since then the latents and poses of most particles say little (an untrained or briefly trained model, very
    noisy particles, or images unlike those it was trained on)."""
    uncertain = int(np.sum(np.asarray(local_mass) < CONFIDENT_MASS))
    total = len(local_mass)
    if uncertain > total / 2:
        warnings.warn(f"most poses are uncertain ({uncertain} of {total}): q(t, r | y) is spread over many "
                      "pixels or rotations; the model may need longer training, or the images may be unlike "
                      "those it was trained on", stacklevel=2)
    return (f"{uncertain} of {total} particles ({100 * uncertain / max(total, 1):.1f} %) have uncertain poses "
            f"(less than {CONFIDENT_MASS:.0%} of q(t, r | y) within 1 px and one rotation bin of the chosen cell)")


def symmetry_hint(rotation_mass) -> np.ndarray:
    """Cyclic order n per particle that best explains q(r | y), the rotation mass (B, R).

    An object with C_n symmetry looks the same at n rotations 2 pi / n apart, so the encoder's posterior
    puts equal mass on n bins spaced R / n apart. For every divisor n of R, the L1 distance between q(r | y)
    and the best-placed such n-bin pattern (1/n on each) is computed; the smallest n within 1e-6 of the best
    distance wins. Mass spread over every bin (a round or featureless particle) gives n = R.
    """
    mass = np.asarray(rotation_mass, dtype=np.float64)
    mass = mass / mass.sum(1, keepdims=True)
    bins = mass.shape[1]
    orders = [n for n in range(1, bins + 1) if bins % n == 0]
    distance = np.stack([_pattern_distance(mass, n) for n in orders], axis=1)
    best = distance.min(1, keepdims=True)
    return np.asarray(orders)[np.argmax(distance <= best + 1e-6, axis=1)]


def _pattern_distance(mass, order) -> np.ndarray:
    """min over phases of || mass - (1/order on bins phase + k R/order) ||_1, for every row of mass (B, R)."""
    spacing = mass.shape[1] // order
    on_pattern = mass.reshape(len(mass), order, spacing)  # [b, k, phase] = mass of bin phase + k * spacing
    captured = on_pattern.sum(1)
    mismatch = np.abs(on_pattern - 1.0 / order).sum(1)
    return (mismatch + 1.0 - captured).min(1)
