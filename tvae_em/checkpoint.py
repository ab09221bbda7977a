"""The record of a training run, written and read here: checkpoints (atomic writing, validated reading, the
training state a resumed run continues from, random-state capture, ``load_model``), log.csv, and the files of a
run folder.

A checkpoint is a ``torch.save`` dict holding plain tensors, numbers, strings, lists and dicts only, so it is
read with ``weights_only=True`` (a checkpoint received from someone else cannot run code on load). Every
checkpoint carries ``format_version``: a reader upgrades the older formats it knows (``_UPGRADES``) and refuses
any other version instead of misreading the layout.

Besides the learned state, a checkpoint keeps the encoder's expanded filters (``ENCODER_EXPORT``, the state of a
``PlainEncoder``), from which ``load_model`` builds the model for inference without importing escnn or sampling
its filter bases. Checkpoints written before it are read through escnn; ``python -m tvae_em.checkpoint
RUN_OR_CHECKPOINT`` adds it to them (where escnn is installed). escnn's sampled filter bases are not kept (they are
rebuilt with the model), only a fingerprint of each that loading checks: a checkpoint of the default model at
100 px is 35 MB instead of 330.
"""

import csv
import io
import math
import random
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from tvae_em import __version__, console
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.errors import InputError, TvaeError, UsageError
from tvae_em.io.atomic import atomic_path, locked_folder
from tvae_em.io.files import regular_file
from tvae_em.memory import check_fits, model_bytes
from tvae_em.model import TargetVAE
from tvae_em.model.vae import EscnnMissing

FORMAT_VERSION = 2
# The files of a run folder (tvae_em.train describes them); LOCK is held while a training process writes the run.
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
LOG = "log.csv"
CURVE = "learning_curve.png"
SPLIT = "split.npz"
CONFIG = "config.json"
RUN_LOG = "run.log"
LOCK = ".lock"
RUN_FILES = (LAST, BEST, LOG, CURVE, SPLIT, CONFIG, RUN_LOG, LOCK)
# Every checkpoint's fields and their types, checked before anything is built from them.
REQUIRED_FIELDS = {"format_version": int, "version": str, "model_config": dict, "train_config": dict,
                   "model_state": dict, "epoch": int}
# The optional field holding the exported encoder (``encoder_export``); checkpoints without it predate it.
ENCODER_EXPORT = "encoder_export"

# escnn's R2Conv caches its expanded filter and bias as buffers that exist only in some train/eval states;
# they are recomputed from the weights, so checkpoints leave them out and loading tolerates their absence.
_DERIVED_BUFFERS = (".filter", ".expanded_bias")
# escnn's sampled filter bases are fixed by the configuration and rebuilt with the model: most of a checkpoint's
# bytes at cryo-EM boxes (269 of 278 MB at 100 px), so a checkpoint keeps only a fingerprint of each, which
# loading compares with the rebuilt basis (an escnn that samples its bases otherwise would change every filter).
_SAMPLED_BASIS = ".sampled_basis"
_FINGERPRINT = "_fingerprint"
_REMEMBERED = "_tvae_fingerprint"  # the attribute of a basis tensor holding its fingerprint (basis_fingerprint)


def build_model(config: ModelConfig, seed: int = 0, plain_encoder: bool = False) -> TargetVAE:
    """A freshly initialised model, reproducible from ``seed``, without touching the caller's global RNG
    (``plain_encoder``: ``TargetVAE``'s inference-only encoder, to be loaded from a checkpoint's export)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TargetVAE(config, plain_encoder)


def model_state(model: torch.nn.Module) -> dict:
    """The model's learned state on the CPU, without escnn's derived filter caches, and each sampled filter basis
    replaced with its fingerprint (``basis_fingerprint``)."""
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # the buffers themselves: fingerprints remembered
        if name.endswith(_SAMPLED_BASIS):
            state[name + _FINGERPRINT] = basis_fingerprint(tensor)
        elif not name.endswith(_DERIVED_BUFFERS):
            state[name] = tensor.detach().cpu().clone()
    return state


def basis_fingerprint(basis: torch.Tensor) -> torch.Tensor:
    """(norm, projection on a fixed random direction, element count) in float64: equal within float rounding for
    the same basis sampled on any machine, different for a basis reordered, rescaled or resized. Remembered per
    basis tensor (a few seconds at 100 px, and a run saves every epoch with the same bases)."""
    known = getattr(basis, _REMEMBERED, None)
    if known is None or known[0] != basis._version:  # _version counts in-place changes
        known = (basis._version, _fingerprint(basis))
        setattr(basis, _REMEMBERED, known)  # on the buffer itself: no table of tensors to keep or clean up
    return known[1].clone()


def _fingerprint(basis: torch.Tensor) -> torch.Tensor:
    values = basis.detach().cpu().double().flatten().numpy()
    direction = np.random.default_rng(0).standard_normal(values.size)
    # numpy's pairwise sums, not a BLAS dot product whose rounding follows the thread count
    return torch.tensor([np.sqrt(np.sum(values * values)), np.sum(values * direction), float(values.size)],
                        dtype=torch.float64)


def encoder_export(model: TargetVAE) -> dict:
    """The checkpoint field ``ENCODER_EXPORT``: the encoder's expanded filters as a ``PlainEncoder`` holds them.

    Small enough for every checkpoint to keep it: with the default 8 rotations and 128 fields, 13 MB of a 21 MB
    checkpoint at 50 px and 26 MB of 35 MB at 100 px (before the optimiser's state).
    """
    return model.encoder.exported_state()


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """Load ``state`` into ``model``; InputError naming ``path`` if a learned tensor is missing, extra, not a
    tensor, or holds NaN or infinite values (which would reach every latent and pose computed from it)."""
    if not all(isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state.items()):
        raise InputError(path, "malformed checkpoint: model weights that are not named tensors")
    not_finite = [name for name, tensor in state.items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if not_finite:
        raise InputError(path, f"model weights contain NaN or infinite values (in {', '.join(not_finite[:3])})")
    state = dict(state)
    fingerprints = {name: state.pop(name) for name in list(state) if name.endswith(_SAMPLED_BASIS + _FINGERPRINT)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        problem = f"model weights do not fit the model configuration ({first_line(exc)})"
        raise InputError(path, problem) from None
    _check_bases(model, fingerprints, path)
    missing = [name for name in missing if not name.endswith(_DERIVED_BUFFERS)
               and not (name.endswith(_SAMPLED_BASIS) and name + _FINGERPRINT in fingerprints)]
    if missing or unexpected:
        raise InputError(path, f"model weights do not fit the model (missing {missing[:3]}, "
                               f"unexpected {list(unexpected)[:3]})")


def _check_bases(model: torch.nn.Module, fingerprints: dict, path) -> None:
    """InputError unless every sampled filter basis the model rebuilt matches the fingerprint it was saved with."""
    buffers = dict(model.named_buffers(remove_duplicate=False))  # escnn shares one basis between layers
    for key, saved in fingerprints.items():
        basis = buffers.get(key[:-len(_FINGERPRINT)])
        if basis is None:
            raise InputError(path, f"model weights do not fit the model (unexpected {key})")
        rebuilt = basis_fingerprint(basis)
        if saved.shape != rebuilt.shape or not torch.allclose(saved.double(), rebuilt, rtol=1e-5,
                                                               atol=1e-6 * float(rebuilt[0])):
            raise InputError(path, f"escnn {console.versions()['escnn']} samples the encoder's filter bases "
                                   "differently from the escnn the model was trained with (the checkpoint's "
                                   "'escnn_version'): install that one to train on or re-save this model")


def save_checkpoint(state: dict, path) -> None:
    """Write ``state`` (plus format, tvae-em and escnn versions) to ``path`` atomically."""
    buffer = io.BytesIO()  # torch.save to a file turns a full disk into an opaque C++ error: write it ourselves
    torch.save({"format_version": FORMAT_VERSION, "version": __version__,
                "escnn_version": console.versions()["escnn"], **state}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def read_checkpoint(path, map_location="cpu") -> dict:
    """Read and validate a checkpoint file; InputError naming the file if it is not a usable checkpoint."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such checkpoint file")
    regular_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        problem = f"not a readable checkpoint, truncated or corrupt ({first_line(exc)})"
        raise InputError(path, problem) from None
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise InputError(path, "not a tvae-em checkpoint (no format_version)")
    version = checkpoint["format_version"]
    if version != FORMAT_VERSION and version not in _UPGRADES:
        raise InputError(path, f"checkpoint format {version} (written by tvae-em {checkpoint.get('version', '?')}) "
                               f"cannot be read by tvae-em {__version__}, which reads formats "
                               f"{', '.join(map(str, sorted([*_UPGRADES, FORMAT_VERSION])))}")
    missing = [key for key in REQUIRED_FIELDS if key not in checkpoint]
    if missing:
        raise InputError(path, f"incomplete checkpoint, missing {', '.join(missing)}")
    check_field_types(checkpoint, REQUIRED_FIELDS, path)
    if version in _UPGRADES:
        _UPGRADES[version](checkpoint)
    return checkpoint


def _upgrade_from_1(checkpoint: dict) -> None:
    """Format 1 (tvae-em before coarse-to-fine training) stated ``fourier_scale`` per unit of the generator's frame,
    image_size / 2 pixels, and had no band (all frequencies always let through)."""
    config, state = checkpoint["model_config"], checkpoint["model_state"]
    scale, size = config.get("fourier_scale"), config.get("image_size")
    if all(isinstance(value, int | float) and not isinstance(value, bool) for value in (scale, size)):
        config["fourier_scale"] = scale / (size / 2)
    if isinstance(state, dict):
        state.setdefault("band_fraction", torch.tensor(1.0))
    checkpoint["format_version"] = FORMAT_VERSION


_UPGRADES = {1: _upgrade_from_1}  # format -> function bringing a checkpoint of that format to FORMAT_VERSION


def check_field_types(checkpoint: dict, types: dict, path) -> None:
    """InputError naming ``path`` if a field of ``types`` is missing or of another type (a bool is no int)."""
    wrong = [key for key, kind in types.items()
             if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool)]
    if wrong:
        raise InputError(path, f"malformed checkpoint: {', '.join(wrong)} missing or not as tvae-em writes it")


# ModelConfig fields added after checkpoints were first written, with the value that older checkpoints, which lack
# them, were trained with, whatever the default now
_IMPLIED_BEFORE_FIELDS = {"encoder_pointwise": "group", "fourier_random_phase": False}


def model_config_from(checkpoint: dict, path) -> ModelConfig:
    try:
        return ModelConfig(**{**_IMPLIED_BEFORE_FIELDS, **checkpoint["model_config"]})
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"invalid model configuration in checkpoint ({exc})") from None


def run_files(path) -> list[Path]:
    """Every file a training run keeps in its folder, for a run directory or a checkpoint file ``path`` (its
    folder's, and the file itself): what no command that reads the run may write over."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    return [path, *(folder / name for name in RUN_FILES)]


def checkpoint_path(path) -> Path:
    """A checkpoint file as given, or the best checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST
        if not path.is_file():
            raise InputError(path.parent, f"run directory without {BEST} (no epoch finished yet?)")
    elif not path.exists():
        raise InputError(path, "no such run directory or checkpoint")
    return path


def load_model(path, map_location="cpu", for_inference: bool = True) -> tuple[TargetVAE, ModelConfig]:
    """The trained model (eval mode, on ``map_location``) and its configuration, from a run directory (its
    best checkpoint) or a checkpoint file. InputError naming the file if missing, corrupt or foreign.

    ``for_inference`` and a checkpoint with ``ENCODER_EXPORT``: the encoder is a ``PlainEncoder`` on the exported
    filters, and escnn is not imported. Otherwise escnn's trainable encoder (and an InputError saying what to do
    when escnn is missing).
    """
    path = checkpoint_path(path)
    checkpoint = read_checkpoint(path, map_location="cpu")
    model = _model_from(checkpoint, path, for_inference)
    return model.to(map_location).eval(), model.config


def _model_from(checkpoint: dict, path, for_inference: bool) -> TargetVAE:
    config = model_config_from(checkpoint, path)
    check_fits(model_bytes(config), torch.device("cpu"), f"the model of {path}", "use a machine with more memory")
    if for_inference and ENCODER_EXPORT in checkpoint:
        model = build_model(config, plain_encoder=True)
        load_model_state(model, _plain_model_state(checkpoint, path), path)
        return model
    try:
        model = build_model(config)
    except EscnnMissing as exc:
        if ENCODER_EXPORT in checkpoint:
            raise
        raise InputError(path, f"this checkpoint predates the exported encoder that lets embed and pose run "
                               f"without escnn, which cannot be imported here ({exc.reason}); install escnn, or "
                               f"re-save it where escnn is installed with 'python -m tvae_em.checkpoint {path}'"
                         ) from None
    load_model_state(model, checkpoint["model_state"], path)
    return model


def _plain_model_state(checkpoint: dict, path) -> dict:
    """The state of a model with a ``PlainEncoder``: the learned state without the escnn encoder's, and the export."""
    check_field_types(checkpoint, {ENCODER_EXPORT: dict}, path)
    learned = {name: tensor for name, tensor in checkpoint["model_state"].items()
               if not (isinstance(name, str) and name.startswith("encoder."))}
    return {**learned, **{f"encoder.{name}": tensor for name, tensor in checkpoint[ENCODER_EXPORT].items()}}


def add_encoder_export(path) -> Path:
    """Rewrite a checkpoint written before ``ENCODER_EXPORT`` existed with it (this needs escnn), so that inference
    reads it without escnn. The folder is locked as a training run locks it, so no epoch is overwritten."""
    path = checkpoint_path(path)
    with locked_folder(path.parent, LOCK, "a training run or another re-save writes into it"):
        checkpoint = read_checkpoint(path, map_location="cpu")
        checkpoint[ENCODER_EXPORT] = encoder_export(_model_from(checkpoint, path, for_inference=False))
        save_checkpoint(checkpoint, path)
    return path


# --- the training record ----------------------------------------------------------------------------------

# log.csv's columns: one row per epoch, also kept in every checkpoint's history
LOG_COLUMNS = ("epoch", "train_elbo", "val_elbo", "reconstruction", "kl_tr", "kl_theta", "kl_z", "kl_shift",
               "lr", "seconds", "data_wait")
_PLOTTED = {"epoch", "train_elbo", "val_elbo", "lr"}  # log columns the learning curve reads
# The fields a checkpoint needs beyond REQUIRED_FIELDS to resume training, with their types.
_RESUME_FIELDS = {"optimizer_state": dict, "scheduler_state": dict, "best_epoch": int, "best_loss": float,
                  "bad_epochs": int, "stop_reason": (str, type(None)), "history": list, "rng": dict,
                  "n_particles": int}


@dataclass
class RunProgress:
    """Where a training run stands after its last complete epoch (what a resumed run continues from)."""

    epoch: int = 0  # complete epochs
    best_epoch: int = 0
    best_loss: float = math.inf  # the monitored loss of best_epoch
    bad_epochs: int = 0  # epochs since the best one
    stop_reason: str | None = None  # 'early_stop', 'max_epochs', or None while epochs remain
    history: list = field(default_factory=list)  # log.csv rows (LOG_COLUMNS), one per epoch
    band_epochs: float = 0.0  # epochs over which the frequency band opens (``TrainConfig.coarse_to_fine``)

    def add_epoch(self, row: dict, monitored: float, early_stop: int, epochs: int) -> bool:
        """Count the epoch of log row ``row`` with its ``monitored`` loss, and decide whether training stops (after
        ``early_stop`` epochs without improvement, or at ``epochs``); whether the epoch is the best so far."""
        improved = monitored < self.best_loss
        if improved:
            self.best_loss, self.best_epoch, self.bad_epochs = monitored, row["epoch"], 0
        else:
            self.bad_epochs += 1
        self.epoch = row["epoch"]
        self.stop_reason = ("early_stop" if self.bad_epochs >= early_stop
                            else "max_epochs" if self.epoch >= epochs else None)
        self.history.append(row)
        return improved


def training_checkpoint(model: TargetVAE, train_config: TrainConfig, optimizer, scheduler, progress: RunProgress,
                        n_particles: int, rows: np.ndarray | None) -> dict:
    """Everything needed to continue a run after its last complete epoch (``save_checkpoint`` writes it):
    the model and its exported encoder, the settings, the optimiser's and scheduler's states, ``progress``, the
    particles (their count and the input ``rows`` of --ind, None for all) and the global random states."""
    return {"model_config": model.config.to_dict(), "train_config": train_config.to_dict(),
            "model_state": model_state(model), "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(), **asdict(progress), "n_particles": n_particles,
            "particle_rows": None if rows is None else torch.from_numpy(np.asarray(rows, np.int64)),
            ENCODER_EXPORT: encoder_export(model), "rng": capture_rng_state()}


def read_training_checkpoint(path) -> dict:
    """``read_checkpoint``, also checking the fields that resuming training needs."""
    checkpoint = read_checkpoint(path)
    check_field_types(checkpoint, _RESUME_FIELDS, path)
    if not all(isinstance(row, dict) and _PLOTTED <= row.keys() <= set(LOG_COLUMNS)
               for row in checkpoint["history"]):
        raise InputError(path, "malformed checkpoint: history rows are not log.csv rows")
    return checkpoint


def run_progress(checkpoint: dict) -> RunProgress:
    """The progress a training checkpoint (``read_training_checkpoint``) records."""
    return RunProgress(epoch=checkpoint["epoch"], best_epoch=checkpoint["best_epoch"],
                       best_loss=checkpoint["best_loss"], bad_epochs=checkpoint["bad_epochs"],
                       stop_reason=checkpoint["stop_reason"], history=checkpoint["history"],
                       band_epochs=float(checkpoint.get("band_epochs", 0.0)))  # before coarse-to-fine: none


def restore_training(checkpoint: dict, path, model: TargetVAE, optimizer, scheduler) -> RunProgress:
    """Load a training checkpoint's model, optimiser, scheduler and random states; InputError naming ``path`` if
    they do not fit (torch, numpy and Python raise all sorts of errors for malformed states)."""
    load_model_state(model, checkpoint["model_state"], path)
    try:
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        scheduler.load_state_dict(checkpoint["scheduler_state"])
        restore_rng_state(checkpoint["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise InputError(path, f"malformed training state in checkpoint ({first_line(exc)})") from None
    return run_progress(checkpoint)


def run_rows(checkpoint: dict, path, n_rows: int | None = None) -> np.ndarray | None:
    """The rows of its input the run was trained on (``--ind``), None for all; UsageError when they go beyond an
    input of ``n_rows`` particles."""
    rows = checkpoint.get("particle_rows")  # runs from before --ind: all rows
    if rows is None:
        return None
    if not isinstance(rows, torch.Tensor) or rows.ndim != 1 or rows.dtype != torch.int64:
        raise InputError(path, "malformed checkpoint: particle_rows is not a list of row indices")
    if n_rows is not None and rows.numel() and int(rows.max()) >= n_rows:
        raise UsageError(f"{path.parent} was trained on rows up to {int(rows.max())} (0-based, --ind) of its "
                         f"input, but this input has {n_rows} particles")
    return rows.numpy()


def train_config_from(checkpoint: dict, path) -> TrainConfig:
    """The run's training settings, except those of ``TrainConfig.PER_INVOCATION`` (TrainConfig's defaults)."""
    stored = {f.name for f in fields(TrainConfig)} - set(TrainConfig.PER_INVOCATION)
    try:
        return TrainConfig(**{key: value for key, value in checkpoint["train_config"].items() if key in stored})
    except (TypeError, UsageError) as err:
        raise InputError(path, f"malformed checkpoint: training settings ({err})") from None


def write_log(history: list[dict], path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(history)



# --- random states ---------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Global random states of torch (CPU and the current CUDA device), numpy and Python, weights_only-safe.

    Only the current CUDA device: touching the others would create a context on GPUs that belong to other
    ranks (and fail on GPUs in exclusive-process mode). A CPU run leaves CUDA uninitialised.
    """
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": numpy_state, "python": random.getstate()}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], np.uint32)}
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv=None) -> None:
    """``python -m tvae_em.checkpoint RUN_OR_CHECKPOINT...``: ``add_encoder_export`` to each, errors as one line."""
    for name in sys.argv[1:] if argv is None else argv:
        try:
            print(f"{add_encoder_export(name)}: exported encoder added", file=sys.stderr)
        except TvaeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
