"""Training (paper section 4, implementation details) with exact resume, divergence and signal safety.

The loop: Adam on the -ELBO (eq. 6) with ``TrainConfig``'s recipe (``tvae_em.config``), the frequency band of the
model opened from coarse to fine over its first epochs (``TargetVAE.open_band``), the learning rate halved on a
plateau and early stopping. A random fraction of the particles is held out (as in the EMPIAR-10025 experiment)
and its -ELBO is the monitored loss; with ``val_fraction=0`` the training -ELBO is monitored instead.

Reproducibility. The split, the data order of epoch e and the sampling noise of epoch e come from generators
seeded by (seed, stream, e[, rank]), never from global random state, so a run resumed from the checkpoint of
epoch e - 1 replays epoch e exactly as an uninterrupted run does (bit-identical on CPU). The global torch,
CUDA, numpy and Python states are saved and restored as well, for any library code that draws from them.

Interruption. SIGINT/SIGTERM stop training within seconds (``tvae_em.runtime``): the epoch in progress is
dropped (nothing of it is saved), completed epochs stay in ``checkpoint_last.pt``, and ``Interrupted`` is
raised. Saving an epoch is never cut in half: a signal that arrives meanwhile takes effect once it is saved.
On CPU the autograd engine runs a batch's backward pass on the main thread without running Python code, for
tens of seconds with the default generator on a busy machine, so the forward pass of a single CPU process
leaves a Python call before each backward step (``runtime.interruptible_backward``) where the signal can take
effect.
A NaN/inf loss or gradient raises ``TrainingDiverged`` before the optimiser step, so no non-finite parameter is
ever written.

One process at a time: rank 0 holds an exclusive lock on ``run_dir`` (``.lock`` in it) for the whole run, so a
second ``train`` into the same folder stops at once with a UsageError instead of replacing the first one's
files.

Multi-GPU. Launched by ``torchrun`` (WORLD_SIZE > 1), every rank joins a process group (NCCL on CUDA, Gloo on
CPU), the model is wrapped in DistributedDataParallel and every batch of the global order is split between
the ranks, so the effective batch stays ``batch_size``. Only rank 0 writes files. A rank that receives a signal
stops at once; torchrun forwards signals to every rank and ends the others when one exits.

Files in ``run_dir``, each written atomically (rank 0 only; their names and the checkpoint's layout are
``tvae_em.checkpoint``'s):
    split.npz           0-based particle indices of the training and validation sets, and the rows of the input
                        they index (``input_rows``: all, or those chosen by ``--ind``), written once
    checkpoint_last.pt  everything needed to continue after the last complete epoch
    checkpoint_best.pt  the same, for the epoch with the best monitored loss (what ``load_model`` returns)
    log.csv             one row per epoch; reconstruction and KL columns are training-epoch means
    learning_curve.png  training and validation ELBO, learning rate
    config.json         the command line, versions, inputs, device and the model and training configurations
                        of the latest invocation (rewritten on resume)
    run.log             appended by every invocation: a header (date, command line, versions, host, device),
                        then every message, epoch line, warning and error, whatever the verbosity
    .lock               empty; locked while a training process writes the run
"""

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from tvae_em import checkpoint as ckpt
from tvae_em import console, plots
from tvae_em.config import ModelConfig, TrainConfig
from tvae_em.ctf import ctf_mode, particle_ctf
from tvae_em.ctf import transfer as ctf_transfer
from tvae_em.device import (
    bf16_autocast,
    bf16_autocast_enabled,
    plan_threads,
    resolve_device,
    torch_threads,
)
from tvae_em.errors import InputError, Interrupted, TvaeError, UsageError
from tvae_em.io.atomic import atomic_path, locked_folder, refuse_overwriting
from tvae_em.memory import FLOAT_BYTES, check_fits, model_bytes
from tvae_em.resume import check_resumable, nothing_to_do, rows_text, same_rows
from tvae_em.resume import conflicts as resume_conflicts
from tvae_em.runtime import (
    CarriedError,
    ProcessGroup,
    Stop,
    deferred_signals,
    ignore_stop_signals,
    interruptible_backward,
    stop_on_signals,
)

METRICS = ("elbo", "reconstruction", "kl_tr", "kl_theta", "kl_z", "kl_shift")

# Preprocessed images have pixel mean ~0 and std ~1 (background normalised); beyond this limit they were not.
_NORMALISED_LIMIT = 10.0
_SCALE_SAMPLE = 100
_SMALLER_MODEL = ("use fewer --encoder-fields or --rotations, a smaller --encoder-kernel, --generator-width, "
                  "--generator-depth or --batch-size, or smaller images (preprocess -D)")

# Independent random streams, each seeded by (seed, stream, ...).
_SPLIT, _INIT, _ORDER, _NOISE, _VALIDATION = range(5)


class TrainingDiverged(TvaeError):
    """The loss or its gradient became NaN/inf; nothing of the failing epoch was saved."""


@dataclass
class TrainResult:
    """Where a run's files are and how it ended."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    epochs: int  # completed epochs
    best_epoch: int
    stop_reason: str  # 'early_stop' or 'max_epochs'
    metrics: dict  # log row (LOG_COLUMNS) of the last epoch
    best_metrics: dict  # log row of the best epoch


@console.transcript()
def train(model_config: ModelConfig | None, train_config: TrainConfig, particles, run_dir,
          resume: bool = False, inputs: dict | None = None) -> TrainResult:
    """Train a TARGET-VAE on ``particles`` (any object with ``len()`` and ``read(sorted indices) -> (k, N, N)
    float32``) and write the run into ``run_dir``.

    ``resume=True`` continues from ``checkpoint_last.pt`` (``model_config`` may then be None: the stored one
    is used) up to ``train_config.epochs`` epochs in all, and ends with the same parameters as an uninterrupted
    run; without a checkpoint it starts afresh. A finished run (stopped early, or ``train_config.epochs``
    epochs done) is left untouched: one line on stderr says so and its result is returned. A fresh run refuses
    a ``run_dir`` that already holds a checkpoint. ``inputs`` (JSON values: what ``particles`` were read from)
    goes into ``config.json``.

    Raises Interrupted (SIGINT/SIGTERM), TrainingDiverged (NaN/inf loss), UsageError (impossible request,
    resume mismatch, or ``run_dir`` in use by another training process), InputError (unreadable checkpoint) or
    TvaeError (unusable particle images); in every case the files of completed epochs are kept intact.
    """
    run_dir = Path(run_dir)
    if resume and not run_dir.is_dir():
        raise InputError(run_dir, "no such run directory to resume")
    device = resolve_device(train_config.device, int(os.environ.get("LOCAL_RANK", "0")))
    threads = plan_threads(train_config.threads, train_config.num_workers)
    train_config = replace(train_config, num_workers=threads.workers)
    group = ProcessGroup.start(device)
    try:
        with stop_on_signals(), torch_threads(threads.threads), \
                console.silenced(not train_config.progress or group.rank != 0):
            try:
                checkpoint = _checkpoint_to_resume(run_dir) if resume else None
                if checkpoint is not None:
                    model_config = check_resumable(checkpoint, run_dir, model_config, train_config, particles)
                    done = nothing_to_do(checkpoint, train_config)
                    if done:
                        console.note(f"{run_dir}: {done}")
                        return _result(run_dir, ckpt.run_progress(checkpoint))
                trainer = _Trainer(model_config, train_config, particles, run_dir, resume, checkpoint, device,
                                   group, inputs)
            except Stop as stop:
                raise Interrupted(f"{stop.name} received before the first epoch began: stopped, nothing was "
                                  "trained") from None
            return trainer.run()
    finally:
        group.close()


@console.transcript()
def train_from_star(star_path, run_dir, train_config: TrainConfig, model_options: dict | None = None,
                    datadir=None, resume: bool = False, ctf: str = "auto", indices_file=None) -> TrainResult:
    """``train`` on the particles of a RELION/Topaz STAR file (only those of the rows ``indices_file`` lists, when
    given: ``open_particles``); the model's image size is the particle box.

    ``model_options`` are ModelConfig fields other than ``image_size`` and ``ctf``, which ``ctf_mode`` sets from
    the ``ctf`` request and the particles; when resuming without them the run's stored configuration is used.
    UsageError for options out of range, or for a run folder whose files would replace the STAR file or one of
    its stacks.
    """
    # imported here: train() itself works on any particle source, only this entry point reads STAR/MRCS
    from tvae_em.io.stack import open_particles

    particles = open_particles(star_path, datadir=datadir, indices_file=indices_file)
    refuse_overwriting(ckpt.run_files(run_dir)[1:], _inputs(star_path, particles, indices_file))
    if resume and model_options is None:
        model_config = None
    else:
        try:
            model_config = ModelConfig(image_size=particles.box, ctf=ctf_mode(ctf, particles),
                                       **(model_options or {}))
        except (TypeError, ValueError) as err:
            raise UsageError(f"invalid model configuration: {err}") from None
    return train(model_config, train_config, particles, run_dir, resume=resume,
                 inputs=_star_inputs(star_path, datadir, ctf))


@console.transcript()
def resume_from_star(star_path, run_dir, requested: dict | None = None, datadir=None,
                     indices_file=None) -> TrainResult:
    """Continue the run in ``run_dir`` on the particles of ``star_path`` with the settings it was started with.

    ``requested`` holds the options given again (TrainConfig and ModelConfig fields, ``preset``, ``ctf``):
    ``epochs`` is the new total (default: the run's), ``device`` and ``amp`` may change, and ``device``,
    ``num_workers`` and ``progress`` are this invocation's (default: TrainConfig's), not the run's. Any other
    setting that differs from the run's (a ``preset`` whose batch size, learning rate or coarse-to-fine do, a
    ``ctf`` request that models the CTF otherwise) would change the optimisation or the model: UsageError naming
    each; one equal to the run's is accepted. The particles are those of the rows the run was trained on
    (``--ind``); an ``indices_file`` that lists other rows is refused the same way. UsageError too for a run
    folder without a completed epoch, whose settings are unknown.
    """
    from tvae_em.io.indices import read_row_indices
    from tvae_em.io.stack import open_particles

    requested, run_dir = dict(requested or {}), Path(run_dir)
    particles = open_particles(star_path, datadir=datadir)
    refuse_overwriting(ckpt.run_files(run_dir)[1:], _inputs(star_path, particles, indices_file))
    path = run_dir / ckpt.LAST
    if not run_dir.is_dir():
        raise InputError(run_dir, "no such run directory to resume")
    if not path.exists():
        raise UsageError(f"{run_dir} holds no completed epoch, so no settings to resume with: start it again "
                         f"with -o {run_dir} and its options")
    checkpoint = ckpt.read_checkpoint(path)
    model_config, train_config = ckpt.model_config_from(checkpoint, path), ckpt.train_config_from(checkpoint, path)
    conflicts = resume_conflicts(train_config, model_config, requested, particles)
    run_rows = ckpt.run_rows(checkpoint, path, len(particles))
    if indices_file is not None and not same_rows(read_row_indices(indices_file, len(particles), star_path),
                                                   run_rows):
        conflicts.append(f"--ind {indices_file} (the run's particles: {rows_text(run_rows, len(particles))})")
    if conflicts:
        raise UsageError(f"cannot resume {run_dir} with {'; '.join(conflicts)}: only --epochs (the new total), "
                         "--device and --amp may change; start a new run (-o) to train otherwise")
    if run_rows is not None:
        particles = particles.subset(run_rows)
    changes = {key: requested[key] for key in TrainConfig.RESUMABLE_CHANGES if key in requested}
    return train(model_config, replace(train_config, **changes), particles, run_dir, resume=True,
                 inputs=_star_inputs(star_path, datadir, requested.get("ctf")))


def _star_inputs(star_path, datadir, ctf: str | None) -> dict:
    """What config.json says the run was trained on: absolute paths, and the ``--ctf`` request (None: not given
    to this invocation; ModelConfig.ctf is what it resolved to)."""
    return {"star": str(Path(star_path).resolve()),
            "datadir": None if datadir is None else str(Path(datadir).resolve()), "ctf_request": ctf}


def _inputs(star_path, particles, indices_file) -> list:
    """The files a run folder must not replace."""
    return [star_path, *particles.stack_paths, *([indices_file] if indices_file is not None else [])]


def make_split(n_particles: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted 0-based (train, validation) indices; a seeded random ``val_fraction`` (>= 1) is held out."""
    n_val = 0 if val_fraction == 0 else max(1, round(n_particles * val_fraction))
    if n_particles - n_val < 1:
        raise UsageError(f"{n_particles} particles are too few for a validation fraction of {val_fraction}")
    order = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT])).permutation(n_particles)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# --- the loop ----------------------------------------------------------------------------------------------

class _Trainer:
    """State of one run (model, optimiser, scheduler, counters, history) and the epoch loop over it."""

    def __init__(self, model_config, config: TrainConfig, particles, run_dir: Path, resume: bool,
                 checkpoint: dict | None, device: torch.device, group: ProcessGroup, inputs: dict | None):
        self.config, self.particles, self.run_dir, self.inputs = config, particles, run_dir, inputs
        self.rows = getattr(particles, "rows", None)  # the input rows of a Particles.subset (--ind), None for all
        self.device, self.group = device, group
        self.writes = group.rank == 0
        self.amp = bf16_autocast_enabled(config.amp, device)
        self.resume = resume
        if resume and checkpoint is None:
            console.note(f"{run_dir} holds no completed epoch: starting from the beginning")
        if model_config is None:
            raise UsageError("a model configuration is needed to start a new run")
        self.train_idx, self.val_idx = make_split(len(particles), config.val_fraction, config.seed)
        _check_normalised(particles, self.train_idx, model_config)
        rank_batch, activation_bytes = -(-config.batch_size // group.world), 2 if self.amp else FLOAT_BYTES
        check_fits(model_bytes(model_config, rank_batch, training=True, activation_bytes=activation_bytes),
                   device, f"training this model on batches of {rank_batch} particles", _SMALLER_MODEL)
        self.ctf = particle_ctf(particles, model_config)
        self.model = ckpt.build_model(model_config, seed=_seed(config.seed, _INIT)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        # threshold 0: any decrease counts as an improvement, as for early stopping; the scheduler acts when its
        # count of bad epochs exceeds ``patience``, so patience_lr - 1 halves after exactly patience_lr of them
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.lr_factor, patience=config.patience_lr - 1, threshold=0.0)
        # the band opens over the epochs planned when the run started, whatever a resumed run's new total
        self.progress = ckpt.RunProgress(band_epochs=config.coarse_to_fine * config.epochs)
        if checkpoint is not None:
            self.progress = ckpt.restore_training(checkpoint, run_dir / ckpt.LAST, self.model, self.optimizer,
                                                  self.scheduler)
        self.elbo = self.model.elbo
        if group.world > 1:  # DDP only syncs gradients for calls through its forward()
            self.elbo = DistributedDataParallel(_ElboForward(self.model), broadcast_buffers=False,
                                                device_ids=[device] if device.type == "cuda" else None)

    # --- epochs -------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """The epochs, with the run folder locked from its first write (everything that can be refused has been
        by then, so a refused run leaves no folder behind) to its last."""
        with self._lock():
            if not self.resume and (self.run_dir / ckpt.LAST).exists():
                raise UsageError(f"{self.run_dir} already holds a training run: resume it or choose another "
                                 "directory")
            with self._run_log():
                self._train_epochs()
        return self._result()

    def _train_epochs(self) -> None:
        try:
            if self.writes:
                _remove_stale_temporaries(self.run_dir)
                self._write_config()
                self._write_split()  # identical when resuming (same seed, fraction and particle count)
            self._tell_configuration()
            for epoch in range(self.progress.epoch + 1, self.config.epochs + 1):  # train() returned if none is left
                self._run_epoch(epoch)
                if self.progress.stop_reason == "early_stop":
                    break
        except Stop as stop:
            raise Interrupted(f"{stop.name} received in epoch {self.progress.epoch + 1}: stopped, the epoch was "
                              f"dropped; {self._kept()}; resume to continue") from None

    def _run_log(self):
        """run.log (rank 0): this invocation's header, the lines told before the folder was locked, then every
        line as it is told, and the error that ends the run, if one does."""
        if not self.writes:
            return contextlib.nullcontext()
        info = console.invocation()
        header = [f"=== {info['date']}", f"command: {info['command']}",
                  "versions: " + ", ".join(f"{name} {version}" for name, version in info["versions"].items()),
                  f"host: {info['host']}", f"device: {self._device_text()}"]
        return console.log_file(self.run_dir / ckpt.RUN_LOG, header)

    def _device_text(self) -> str:
        processes = f"{self.group.world} processes" if self.group.world > 1 else "1 process"
        threads, readers = torch.get_num_threads(), self.config.num_workers  # as device.plan_threads chose them
        return (f"{self.device}, bfloat16 autocast {'on' if self.amp else 'off'}, {processes}, {threads} CPU "
                f"thread{'s' * (threads != 1)} and {readers} reading process{'es' * (readers != 1)} each")

    def _write_config(self) -> None:
        """config.json: what this invocation ran, as used (a resumed run's stored model and settings)."""
        record = {**console.invocation(), "inputs": self.inputs, "device": str(self.device),
                  "bf16_autocast": self.amp, "processes": self.group.world,
                  "model_config": self.model.config.to_dict(), "train_config": self.config.to_dict()}
        with atomic_path(self.run_dir / ckpt.CONFIG) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")

    def _tell_configuration(self) -> None:
        """With -v: where the particles come from, where the run computes and every setting."""
        source = f"{self.inputs['star']}, " if self.inputs else ""
        console.detail(f"particles: {source}{len(self.particles)} ({len(self.train_idx)} for training, "
                       f"{len(self.val_idx)} for validation)")
        console.detail(f"device: {self._device_text()}")
        for name, settings in (("model", self.model.config.to_dict()), ("training", self.config.to_dict())):
            console.detail(f"{name}: " + ", ".join(f"{key}={value}" for key, value in settings.items()))

    def _lock(self):
        """Rank 0 alone writes the run, so it alone holds the folder's lock."""
        if not self.writes:
            return contextlib.nullcontext()
        return locked_folder(self.run_dir, ckpt.LOCK, "a training run writes into it")

    def _run_epoch(self, epoch: int) -> None:
        """One epoch: train and validate, then (with signals deferred, so that the epoch either does not count
        or is saved) step the scheduler, update the counters and save."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train_metrics, waited = self._train_epoch(epoch)
        train_seconds = time.perf_counter() - start
        val_metrics = self._validate(epoch)
        with deferred_signals():
            monitored = -(val_metrics or train_metrics)["elbo"]
            self.scheduler.step(monitored)
            row = {"epoch": epoch, "train_elbo": train_metrics["elbo"],
                   "val_elbo": val_metrics["elbo"] if val_metrics else math.nan,
                   **{name: train_metrics[name] for name in METRICS[1:]},
                   "lr": lr, "seconds": round(time.perf_counter() - start, 3),
                   "data_wait": round(waited / max(train_seconds, 1e-9), 4)}
            improved = self.progress.add_epoch(row, monitored, self.config.early_stop, self.config.epochs)
            if self.writes:
                self._save(improved)
            val_text = f", validation ELBO {row['val_elbo']:.2f}" if val_metrics else ""
            # KL(q(t, r) || p(t, r)) near 0 says the attention has not left the prior: no poses learned yet
            console.note(f"epoch {epoch}: training ELBO {row['train_elbo']:.2f}{val_text}, "
                         f"KL(t, r) {row['kl_tr']:.2f} nats, lr {lr:.3g}, {row['seconds']:.1f} s "
                         f"(waiting for data {100 * row['data_wait']:.0f} %){' (best)' if improved else ''}")

    def _train_epoch(self, epoch: int) -> tuple[dict, float]:
        """The epoch's training metrics and the seconds the loop spent waiting for the next batch of images."""
        batches = self._shard(self._epoch_batches(epoch))
        noise = _generator(self.device, self.config.seed, _NOISE, epoch, self.group.rank)
        totals = _Totals()
        self.model.train()
        bar = console.progress(len(batches), f"epoch {epoch}/{self.config.epochs}", "batch", transient=True)
        loader = _WaitClock(self._load(batches))
        with bar:
            for batch, (indices, images, ctf) in enumerate(loader, start=1):
                self._open_band(epoch - 1 + (batch - 1) / len(batches))
                images, transfer = self._inputs(indices, images, ctf)
                with self._autocast(), self._interruptible_backward():
                    terms = self.elbo(images, noise, transfer)
                self.optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                grad_norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters()
                                                     if p.grad is not None])
                finite = torch.isfinite(torch.stack([terms.loss.detach().float(), grad_norm.float()])).all()
                (diverged,) = self._consensus(~finite)
                if diverged:
                    raise TrainingDiverged(
                        f"training diverged: NaN or infinite loss or gradient in epoch {epoch}, batch "
                        f"{batch}; nothing of this epoch was saved ({self._kept()}); lower the learning rate "
                        "or check the particle images")
                self.optimizer.step()
                totals.add(terms, len(indices))
                bar.update()
                bar.set_postfix(elbo=f"{totals.running_elbo():.2f}", refresh=False)
        return totals.reduce(self.group, self.device), loader.waited

    @torch.no_grad()
    def _validate(self, epoch: int) -> dict | None:
        """Validation ELBO with the same sampling noise every epoch, so epochs are compared on equal terms."""
        if len(self.val_idx) == 0:
            return None
        size = self.config.batch_size
        batches = [self.val_idx[i:i + size] for i in range(0, len(self.val_idx), size)]
        noise = _generator(self.device, self.config.seed, _VALIDATION, self.group.rank)
        totals = _Totals()
        self.model.eval()
        for indices, images, ctf in self._load(batches[self.group.rank::self.group.world]):
            images, transfer = self._inputs(indices, images, ctf)
            with self._autocast():
                totals.add(self.model.elbo(images, noise, transfer), len(indices))
        metrics = totals.reduce(self.group, self.device)
        if not math.isfinite(metrics["elbo"]):
            raise TrainingDiverged(f"training diverged: NaN or infinite validation ELBO after epoch {epoch}; "
                                   f"it was not saved ({self._kept()}); lower the learning rate")
        return metrics

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's random order of the training set in batches, each sorted so reads run contiguously."""
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, _ORDER, epoch]))
        order = rng.permutation(self.train_idx)
        size = self.config.batch_size
        return [np.sort(order[i:i + size]) for i in range(0, len(order), size)]

    def _shard(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """This rank's part of every global batch; a final batch too small to give every rank a particle is
        dropped so that all ranks take the same number of steps."""
        world = self.group.world
        if world == 1:
            return batches
        return [np.array_split(batch, world)[self.group.rank] for batch in batches if len(batch) >= world]

    def _load(self, batches: list[np.ndarray]) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(_BatchReader(self.particles, batches, self.ctf), batch_size=None, num_workers=workers,
                          pin_memory=self.device.type == "cuda",
                          worker_init_fn=ignore_stop_signals if workers else None)

    def _inputs(self, indices: torch.Tensor, images, ctf: torch.Tensor | None) -> tuple:
        """The batch's images on the device and, for a model with a CTF, what multiplies their spectra."""
        if isinstance(images, CarriedError):
            raise images.rebuild()
        _check_images(images, indices, self.model.config)
        transfer = None if ctf is None else ctf_transfer(ctf.to(self.device), images.shape[-1],
                                                         self.model.config.ctf)
        return images.to(self.device, non_blocking=True), transfer

    def _autocast(self):
        return bf16_autocast(self.device, self.amp)

    def _open_band(self, epochs_done: float) -> None:
        """Coarse to fine: the generator's band opens linearly over ``band_epochs`` (``TargetVAE.open_band``)."""
        self.model.open_band(epochs_done / self.progress.band_epochs if self.progress.band_epochs else 1.0)

    def _interruptible_backward(self):
        """``_interruptible_backward`` where it helps and is safe: a single process on the CPU. On GPUs the
        backward pass runs on device threads, where signal handlers never run, and keeping Python objects in
        the autograd graphs of DistributedDataParallel ranks made Gloo runs abort at exit now and then."""
        if self.device.type == "cpu" and self.group.world == 1:
            return interruptible_backward()
        return contextlib.nullcontext()

    def _consensus(self, *flags) -> list[bool]:
        """Flags OR-ed over all ranks, so that every rank stops at the same batch."""
        values = torch.stack([torch.as_tensor(flag, dtype=torch.float32, device=self.device)
                              for flag in flags])
        return [bool(v) for v in self.group.all_reduce(values, dist.ReduceOp.MAX).tolist()]

    # --- output -------------------------------------------------------------------------------------------
    def _save(self, improved: bool) -> None:
        """Best before last: if killed in between, the resumed run redoes this epoch and rewrites both."""
        state = ckpt.training_checkpoint(self.model, self.config, self.optimizer, self.scheduler, self.progress,
                                         len(self.particles), self.rows)
        if improved:
            ckpt.save_checkpoint(state, self.run_dir / ckpt.BEST)
        ckpt.save_checkpoint(state, self.run_dir / ckpt.LAST)
        ckpt.write_log(self.progress.history, self.run_dir / ckpt.LOG)
        plots.learning_curve_figure(self.progress.history, self.progress.best_epoch, self.run_dir / ckpt.CURVE)

    def _write_split(self) -> None:
        with atomic_path(self.run_dir / ckpt.SPLIT) as tmp:
            np.savez(tmp, train=self.train_idx, val=self.val_idx, n_particles=len(self.particles),
                     input_rows=np.arange(len(self.particles)) if self.rows is None else self.rows,
                     seed=self.config.seed, val_fraction=self.config.val_fraction)

    def _kept(self) -> str:
        if self.progress.epoch == 0:
            return "no epoch had completed"
        return f"{self.run_dir / ckpt.LAST} holds epoch {self.progress.epoch}"

    def _result(self) -> TrainResult:
        return _result(self.run_dir, self.progress)


# --- resume ------------------------------------------------------------------------------------------------

def _checkpoint_to_resume(run_dir: Path) -> dict | None:
    path = run_dir / ckpt.LAST
    return ckpt.read_training_checkpoint(path) if path.exists() else None


def _result(run_dir: Path, progress: ckpt.RunProgress) -> TrainResult:
    rows = {row["epoch"]: row for row in progress.history}
    return TrainResult(run_dir=run_dir, best_checkpoint=run_dir / ckpt.BEST, last_checkpoint=run_dir / ckpt.LAST,
                       epochs=progress.epoch, best_epoch=progress.best_epoch,
                       stop_reason=progress.stop_reason or "max_epochs", metrics=rows.get(progress.epoch, {}),
                       best_metrics=rows.get(progress.best_epoch, {}))


# --- helpers -----------------------------------------------------------------------------------------------

class _WaitClock:
    """Iterates over ``batches`` and adds up the seconds spent waiting for each item (the data-wait time)."""

    def __init__(self, batches):
        self.batches, self.waited = batches, 0.0

    def __iter__(self):
        items = iter(self.batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield item


class _Totals:
    """Particle-weighted sums of the ELBO terms over an epoch (on this rank)."""

    def __init__(self):
        self.sums = np.zeros(len(METRICS))
        self.count = 0

    def add(self, terms, n: int) -> None:
        values = terms.scalars()
        self.sums += n * np.array([values[name] for name in METRICS])
        self.count += n

    def running_elbo(self) -> float:
        return self.sums[0] / max(self.count, 1)

    def reduce(self, group: ProcessGroup, device: torch.device) -> dict:
        """Means over all ranks' particles."""
        packed = torch.tensor([*self.sums, self.count], dtype=torch.float64, device=device)
        packed = group.all_reduce(packed, dist.ReduceOp.SUM).tolist()
        return {name: total / packed[-1] for name, total in zip(METRICS, packed[:-1], strict=True)}


class _BatchReader(Dataset):
    """Item i: (indices, images, CTF parameters or None) of batch i, the images read by ``particles.read``, so
    memory is bounded by a batch; ``ctf`` holds every particle's CTF parameters when the model applies a CTF."""

    def __init__(self, particles, batches: list[np.ndarray], ctf: np.ndarray | None):
        self.particles, self.batches, self.ctf = particles, batches, ctf

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        indices = self.batches[i]
        ctf = None if self.ctf is None else torch.from_numpy(self.ctf[indices])
        try:
            images = np.require(self.particles.read(indices), np.float32, ["C", "W"])  # torch wants writable
        except TvaeError as error:
            return torch.from_numpy(indices), CarriedError(error), ctf
        return torch.from_numpy(indices), torch.from_numpy(images), ctf


class _ElboForward(nn.Module):
    """Routes ``model.elbo`` through ``forward`` for DistributedDataParallel."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, generator, transfer):
        return self.model.elbo(images, generator, transfer)


def _check_images(images: torch.Tensor, indices: torch.Tensor, config: ModelConfig) -> None:
    """Refuse images the model cannot train on, naming the particles (0-based indices of the input)."""
    n = config.image_size
    if tuple(images.shape[1:]) != (n, n):
        raise TvaeError(f"particle images are {images.shape[1]}x{images.shape[2]} pixels, "
                        f"the model expects {n}x{n}")
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bad.any():
        raise TvaeError(f"particles {_listing(indices[bad])} (0-based) contain NaN or infinite pixels")
    if config.likelihood == "bernoulli":
        outside = ((images < 0) | (images > 1)).flatten(1).any(1)
        if outside.any():
            raise TvaeError(f"particles {_listing(indices[outside])} (0-based) have pixels outside [0, 1], "
                            "which the bernoulli likelihood needs; use the gaussian likelihood for cryo-EM")


def _check_normalised(particles, indices: np.ndarray, config: ModelConfig) -> None:
    """Refuse Gaussian-likelihood training on images that were not normalised (raw counts, std ~100): it
    diverges within a few batches, and the divergence message would send the user to the learning rate
    instead of to ``preprocess``. Judged on up to _SCALE_SAMPLE evenly spaced particles of ``indices``."""
    if config.likelihood != "gaussian":
        return
    sample = np.unique(indices[np.linspace(0, len(indices) - 1, min(len(indices), _SCALE_SAMPLE)).astype(int)])
    images = particles.read(sample)
    mean, std = float(images.mean(dtype=np.float64)), float(images.std(dtype=np.float64))
    if abs(mean) > _NORMALISED_LIMIT or std > _NORMALISED_LIMIT:
        raise TvaeError(f"the particle images are not normalised (pixel mean {mean:.3g}, std {std:.3g} in "
                        f"{len(sample)} particles, where training expects about 0 and 1): run 'tvae-em "
                        "preprocess' on them first")


def _listing(indices: torch.Tensor, shown: int = 5) -> str:
    values = indices.tolist()
    text = ", ".join(str(i) for i in values[:shown])
    return text + (f" and {len(values) - shown} more" if len(values) > shown else "")


def _seed(*key: int) -> int:
    """A 63-bit seed derived from a key of integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _generator(device: torch.device, *key: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(_seed(*key))
    return generator


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporaries that a killed process left behind (SIGKILL skips ``atomic_path``'s clean-up)."""
    for name in ckpt.RUN_FILES:
        for stale in run_dir.glob(f".{name}.*.part{Path(name).suffix}"):
            stale.unlink(missing_ok=True)
