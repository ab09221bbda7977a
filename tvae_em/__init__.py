"""tvae-em: TARGET-VAE (Nasiri & Bepler, NeurIPS 2022) for cryo-EM particle images."""

__version__ = "0.1.0"
