"""Whether a training run can be resumed as asked: the run's stored settings and particles against the request.

A resumed run continues the trajectory of the run it resumes, so every setting outside
``TrainConfig.RESUMABLE_CHANGES`` must stay as the run has it, and so must its particles (their count and the
input rows of ``--ind``); anything else is refused with a UsageError naming each difference.
"""

from pathlib import Path

import numpy as np

from tvae_em import checkpoint as ckpt
from tvae_em.config import RECIPE_SETTINGS, ModelConfig, TrainConfig
from tvae_em.ctf import ctf_mode
from tvae_em.errors import UsageError


def check_resumable(checkpoint: dict, run_dir: Path, model_config, config: TrainConfig, particles) -> ModelConfig:
    """The run's model configuration, after checking the requested configurations and the particles against the
    run (a checkpoint from ``checkpoint.read_training_checkpoint``)."""
    path = run_dir / ckpt.LAST
    stored_model = ckpt.model_config_from(checkpoint, path)
    if model_config is not None:
        _refuse_changes("model", stored_model.to_dict(), model_config.to_dict(), ())
    _refuse_changes("training", checkpoint["train_config"], config.to_dict(), TrainConfig.RESUMABLE_CHANGES)
    if not same_rows(getattr(particles, "rows", None), ckpt.run_rows(checkpoint, path)):
        raise UsageError(f"{run_dir} was trained on other rows of its input than these particles (--ind)")
    if checkpoint["n_particles"] != len(particles):
        raise UsageError(f"{run_dir} was trained on {checkpoint['n_particles']} particles, the input has "
                         f"{len(particles)}")
    return stored_model


def nothing_to_do(checkpoint: dict, config: TrainConfig) -> str | None:
    """Why a run resumed with ``config`` has no epoch left to train, or None when it has."""
    done = checkpoint["epoch"]
    if checkpoint["stop_reason"] == "early_stop":
        return (f"training stopped early after epoch {done} ({checkpoint['bad_epochs']} epochs without "
                "improvement): nothing to do")
    if done >= config.epochs:
        return f"{done} of {config.epochs} epochs are done: nothing to do (give a larger --epochs to train further)"
    return None


def same_rows(rows: np.ndarray | None, run_rows: np.ndarray | None) -> bool:
    return (rows is None and run_rows is None) or (rows is not None and run_rows is not None
                                                   and np.array_equal(rows, run_rows))


def rows_text(rows: np.ndarray | None, n_rows: int) -> str:
    return f"all {n_rows} of the input" if rows is None else f"{len(rows)} rows chosen by --ind"


def conflicts(train_config: TrainConfig, model_config: ModelConfig, requested: dict, particles) -> list[str]:
    """'--option value (the run's setting: value, ...)' for every option given on resume that asks for settings
    other than the run's, outside ``TrainConfig.RESUMABLE_CHANGES``. Options given explicitly override what a
    preset sets, as for a new run."""
    asked = {}  # setting -> (value, the option asking for it)
    preset = requested.get("preset")
    if preset is not None:
        recipe = TrainConfig.preset(preset)
        asked.update({key: (getattr(recipe, key), f"--preset {preset}") for key in RECIPE_SETTINGS})
    for key, value in requested.items():
        if key == "ctf":
            asked[key] = (ctf_mode(value, particles, note=False), f"--ctf {value}")
        elif key != "preset":
            asked[key] = (value, f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    run = {**model_config.to_dict(), **train_config.to_dict()}
    differing = {}  # option -> the run's values of the settings it would change
    for key, (value, option) in asked.items():
        if key not in TrainConfig.RESUMABLE_CHANGES and run.get(key) != value:
            differing.setdefault(option, []).append(f"{key.replace('_', ' ')}: {run.get(key)}")
    return [f"{option} (the run's {', '.join(values)})" for option, values in differing.items()]


def _refuse_changes(what: str, stored: dict, given: dict, allowed: tuple) -> None:
    changed = [f"{key} (run: {stored[key]!r}, now: {given[key]!r})" for key in given
               if key not in allowed and key in stored and stored[key] != given[key]]
    if changed:
        raise UsageError(f"cannot resume with a different {what} configuration: {'; '.join(changed)}")
