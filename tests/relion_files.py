"""STAR text as RELION 3.1 writes it, for tests that build their inputs the way the real program does."""

OPTICS_LABELS = ("rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
                 "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
                 "rlnImageDimensionality")


def optics_block(*rows: str) -> str:
    """RELION 3.1's data_optics block with the usual columns (``OPTICS_LABELS``) and these rows."""
    labels = "\n".join(f"_{label} #{i}" for i, label in enumerate(OPTICS_LABELS, 1))
    return "\n# version 30001\n\ndata_optics\n\nloop_\n" + labels + "\n" + "\n".join(rows) + "\n"
