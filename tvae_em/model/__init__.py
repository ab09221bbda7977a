"""TARGET-VAE (section 3 of the paper): group-convolutional encoder, approximate posterior and KL (eqs. 3-5),
spatial generator (eqs. 1-2), and the ELBO (eq. 6) that ties them together."""

from tvae_em.model.vae import TargetVAE

__all__ = ["TargetVAE"]
