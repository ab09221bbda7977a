"""A tiny, randomly initialised run folder for tests of the commands that read a trained model."""

from tvae_em import checkpoint
from tvae_em.config import ModelConfig

BOX = 16
TINY = dict(image_size=BOX, rotations=4, z_dim=2, encoder_fields=4, generator_width=16, generator_depth=1,
            fourier_features=16, likelihood="gaussian", gaussian_std=1.0)


def save_run(run_dir, export=True, **overrides):
    """Write run_dir/checkpoint_best.pt for a TINY model (``overrides`` change ModelConfig fields), with the
    exported encoder as training writes it, or (``export`` False) as checkpoints from before it were."""
    config = ModelConfig(**{**TINY, **overrides})
    model = checkpoint.build_model(config, seed=0)
    state = {"model_config": config.to_dict(), "train_config": {},
             "model_state": checkpoint.model_state(model), "epoch": 1}
    if export:
        state[checkpoint.ENCODER_EXPORT] = checkpoint.encoder_export(model)
    checkpoint.save_checkpoint(state, run_dir / checkpoint.BEST)
    return run_dir
