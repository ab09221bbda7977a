"""The settings of a model and of its training, with their named presets: the only source of defaults.

``ModelConfig`` is everything needed to rebuild a model (saved in every checkpoint); its defaults are the
cryo-EM model (``MODEL_PRESETS["cryoem"]``: Gaussian likelihood, a generator of 6 layers, paper section 4.3),
and ``ModelConfig.preset("mnist", ...)`` is the paper's MNIST model (Bernoulli likelihood, 2 generator layers).
``TrainConfig`` is the optimisation; its defaults are tvae-em's recipe (``TRAIN_PRESETS["default"]``) and
``TrainConfig.preset("paper")`` is the paper's (section 4.1). The command line takes every default from here
(``option_default``, ``split_options``).

No torch here, so that ``tvae-em --help`` answers at once.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from tvae_em.errors import UsageError

LIKELIHOODS = ("bernoulli", "gaussian")
ROTATION_PRIORS = ("uniform", "normal")
CTF_MODES = ("none", "full", "flipped")  # no CTF; the CTF; |CTF| (images already multiplied by sign(CTF))
CTF_REQUESTS = ("auto", "on", "none")  # ``train --ctf``, resolved to a CTF mode by ``ctf.ctf_mode``
POINTWISE_KINDS = ("group", "shared")  # full 1x1 group convolutions; one matrix shared by the r rotations
# How the model computes (tvae_em.model.kernels): the hand-written fast kernels, or the plain reference code they
# are tested against. The same model and results either way.
KERNELS = ("fast", "reference")
AMP_MODES = ("auto", "bf16", "off")  # bfloat16 autocast (``device.bf16_autocast_enabled``)


@dataclass
class Priors:
    """Prior hyper-parameters (paper section 3.2). Translation std is in pixels of the input image."""

    rotations: int
    translation_std_px: float = 5.0
    rotation_prior: str = "uniform"  # or "normal": discretised N(0, rotation_prior_std^2) over the offsets
    rotation_prior_std_rad: float = math.pi / 4
    theta_std_rad: float | None = None  # std of p(theta | r); the paper's pi / R when None
    shift_std_px: float = 0.5  # sub-pixel offset prior

    def theta_std(self) -> float:
        return self.theta_std_rad if self.theta_std_rad is not None else math.pi / self.rotations


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved in every checkpoint. The defaults are the cryo-EM model."""

    image_size: int
    rotations: int = 8
    z_dim: int = 2
    encoder_fields: int = 128
    encoder_kernel: int | None = None  # None: 0.65 of the box, odd (see __post_init__)
    encoder_padding: int | None = None  # None: 8/50 of the box
    encoder_pointwise: str = "group"  # the 1x1 layers: full group convolutions, or one matrix shared by the rotations
    generator_width: int = 512
    generator_depth: int = 6
    fourier_features: int = 1024
    fourier_scale: float = 0.12  # std of the random Fourier frequencies, cycles per pixel of the box
    fourier_random_phase: bool = False  # features cos(2 pi B x + phi), phi fixed at random, not [cos, sin]
    likelihood: str = "gaussian"
    gaussian_std: float | None = None  # fixed pixel noise std; learned when None
    translation_prior_std: float = 5.0  # pixels
    rotation_prior: str = "uniform"
    rotation_prior_std: float = math.pi / 4
    theta_prior_std: float | None = None  # pi / rotations when None (the paper's choice)
    subpixel: bool = False
    shift_prior_std: float = 0.5  # pixels, sub-pixel offsets only
    temperature: float = 1.0  # Gumbel-softmax
    ctf: str = "none"  # what multiplies the posed image's spectrum: none, the CTF ('full') or |CTF| ('flipped')
    kernels: str = "fast"  # KERNELS: how the model computes, not what

    def __post_init__(self):
        if self.encoder_kernel is None:
            # The first layer must see a whole particle (the paper: "larger than the size of the targeted
            # objects"): 0.65 of the box, the authors' choice for particles (65 at 100 px; their MNIST ratio, 28 of
            # 50, missed the far features of particles filling 60 % of the box, and poses split between the
            # orientations of a pseudo-symmetric core). Odd, so that the translation cells sit on whole pixels
            # and one of them on the box centre N//2.
            self.encoder_kernel = max(3, round(self.image_size * 0.65) // 2 * 2 + 1)
        if self.encoder_padding is None:
            self.encoder_padding = round(self.image_size * 8 / 50)
        self._validate()

    @classmethod
    def preset(cls, name: str, **changes) -> "ModelConfig":
        """The named model (``MODEL_PRESETS``: 'cryoem' or 'mnist') with ``changes`` on top."""
        return cls(**{**_preset(MODEL_PRESETS, name, "model"), **changes})

    # smallest value of each whole-number field; positive real fields (None allowed for the optional ones)
    _COUNTS = {"image_size": 2, "rotations": 1, "z_dim": 1, "encoder_fields": 1, "encoder_kernel": 1,
               "encoder_padding": 0, "generator_width": 1, "generator_depth": 1, "fourier_features": 0}
    _POSITIVE = ("fourier_scale", "translation_prior_std", "rotation_prior_std", "shift_prior_std", "temperature")
    _OPTIONAL_POSITIVE = ("gaussian_std", "theta_prior_std")
    _CHOICES = {"likelihood": LIKELIHOODS, "rotation_prior": ROTATION_PRIORS, "ctf": CTF_MODES,
                "encoder_pointwise": POINTWISE_KINDS, "kernels": KERNELS}

    def _validate(self) -> None:
        """ValueError naming the first field out of range: configurations come from the command line and from
        checkpoints, and a bad value would otherwise fail deep inside escnn or torch, or train a model that
        cannot be used (z_dim 0)."""
        for name, smallest in self._COUNTS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
                raise ValueError(f"{name} must be a whole number >= {smallest}, not {value!r}")
        for name in self._POSITIVE + self._OPTIONAL_POSITIVE:
            value = getattr(self, name)
            if value is None and name in self._OPTIONAL_POSITIVE:
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        if self.ctf != "none" and self.likelihood != "gaussian":
            raise ValueError("a CTF needs the gaussian likelihood (it makes pixel values of either sign)")
        for name in ("subpixel", "fourier_random_phase"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.image_size + 2 * self.encoder_padding < self.encoder_kernel:
            raise ValueError(f"encoder_kernel {self.encoder_kernel} is larger than the {self.image_size} px images "
                             f"with encoder_padding {self.encoder_padding} on each side")

    def priors(self) -> Priors:
        return Priors(
            rotations=self.rotations, translation_std_px=self.translation_prior_std,
            rotation_prior=self.rotation_prior, rotation_prior_std_rad=self.rotation_prior_std,
            theta_std_rad=self.theta_prior_std, shift_std_px=self.shift_prior_std)

    def to_dict(self) -> dict:
        return asdict(self)

    def coordinate_inputs(self) -> int:
        """Inputs of the generator's coordinate layer: [cos, sin] of each Fourier feature, one phase-shifted cosine
        each, or the plain (x, y)."""
        if self.fourier_features == 0:
            return 2
        return self.fourier_features * (1 if self.fourier_random_phase else 2)


@dataclass
class TrainConfig:
    """Optimisation settings. The defaults are tvae-em's recipe, measured to find poses and classes within a few
    epochs on every seed tried (benchmarks/RESULTS.md, "Training that learns"): Adam at 2e-3 on batches of 32,
    with the frequency band of the generator and of the encoder's input opened coarse to fine over the first
    half of the epochs (``TargetVAE.open_band``). ``preset("paper")`` is the paper's (section 4.1): 2e-4,
    batches of 100, up to 500 epochs, all frequencies from the start. Both halve the learning rate after
    ``patience_lr`` epochs without improvement and stop after ``early_stop``.
    """

    batch_size: int = 32
    epochs: int = 20  # maximum; early stopping may end the run before
    lr: float = 2e-3
    coarse_to_fine: float = 0.5  # fraction of the epochs over which the frequency band opens; 0: all at once
    val_fraction: float = 0.1
    seed: int = 0
    patience_lr: int = 10  # epochs without improvement after which the learning rate is multiplied by lr_factor
    lr_factor: float = 0.5
    early_stop: int = 20  # epochs without improvement before training stops
    device: str = "auto"  # 'auto' (first CUDA GPU, else CPU), 'cpu', 'cuda', 'cuda:1', ...
    amp: str = "auto"  # 'auto': bfloat16 autocast on CUDA and AMX-BF16 CPUs, else none; 'bf16': always; 'off': never
    num_workers: int = 2  # at most this many processes read batches ahead of the loop (``device.plan_threads``)
    threads: int | None = None  # CPUs to use, workers included; None: those the process may use (``cpu_budget``)
    progress: bool = True  # a bar per epoch on a terminal and a summary line per epoch on stderr

    # Settings that may change when a run is resumed (epochs: the new total); all others shape the trajectory and
    # must stay.
    RESUMABLE_CHANGES: ClassVar[tuple] = ("epochs", "device", "amp", "num_workers", "threads", "progress")
    # Where and how visibly a process computes: each invocation's own, never taken from a run it resumes.
    PER_INVOCATION: ClassVar[tuple] = ("device", "num_workers", "threads", "progress")

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.patience_lr >= 1 and self.early_stop >= 1, "patience_lr and early_stop must be at least 1"),
            (0 <= self.coarse_to_fine <= 1, "coarse_to_fine must be in [0, 1]"),
            (0 < self.lr_factor < 1, "lr_factor must be in (0, 1)"),
            (self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.threads is None or self.threads >= 1, "threads must be at least 1"),
        ]
        for ok, problem in checks:
            if not ok:
                raise UsageError(problem)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **changes) -> "TrainConfig":
        """The named recipe ('default' or 'paper') with ``changes`` on top."""
        return cls(**{**_preset(TRAIN_PRESETS, name, "training"), **changes})


# Named presets: the changes each makes to the dataclass defaults.
MODEL_PRESETS = {"cryoem": {}, "mnist": {"likelihood": "bernoulli", "generator_depth": 2}}
TRAIN_PRESETS = {"default": {}, "paper": {"batch_size": 100, "epochs": 500, "lr": 2e-4, "coarse_to_fine": 0.0}}
# What a training preset given on resume is checked against: its recipe without the epochs, which resume sets anew.
RECIPE_SETTINGS = sorted({key for recipe in TRAIN_PRESETS.values() for key in recipe} - {"epochs"})


def _preset(presets: dict, name: str, what: str) -> dict:
    if name not in presets:
        raise UsageError(f"unknown {what} preset {name!r}; expected one of {', '.join(presets)}")
    return presets[name]


def option_default(config_class, name: str, preset: str | None = None):
    """The default of setting ``name`` of ``config_class`` (ModelConfig or TrainConfig), under the named preset
    when given: what the command line shows and uses."""
    presets, what = (MODEL_PRESETS, "model") if config_class is ModelConfig else (TRAIN_PRESETS, "training")
    changes = _preset(presets, preset, what) if preset else {}
    if name in changes:
        return changes[name]
    return next(field.default for field in fields(config_class) if field.name == name)


def split_options(options: dict) -> tuple[dict, dict]:
    """Command-line settings split into (TrainConfig fields, ModelConfig fields) by the dataclasses' own field
    names (an option is named after its setting)."""
    train_names = {field.name for field in fields(TrainConfig)}
    model_names = {field.name for field in fields(ModelConfig)}
    unknown = sorted(options.keys() - train_names - model_names)
    if unknown:  # a command-line option without a setting of its name: a bug, not the user's mistake
        raise TypeError(f"unknown settings: {', '.join(unknown)}")
    return ({key: value for key, value in options.items() if key in train_names},
            {key: value for key, value in options.items() if key in model_names})
