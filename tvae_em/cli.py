"""The ``tvae-em`` command line: option parsing only; every command calls one library function.

Errors caused by the user's input (``tvae_em.errors.TvaeError``) print one line on stderr and exit with the
error's code (2 usage, 3 data, 4 output not writable, 130 interrupted); ``--debug`` shows the traceback
instead.
"""

import sys
import warnings

import click
from click.core import ParameterSource

from tvae_em import __version__, console
from tvae_em.config import (
    AMP_MODES,
    CTF_REQUESTS,
    LIKELIHOODS,
    POINTWISE_KINDS,
    ROTATION_PRIORS,
    TRAIN_PRESETS,
    ModelConfig,
    TrainConfig,
    option_default,
    split_options,
)
from tvae_em.errors import EXIT_INTERRUPTED, TvaeError, UsageError
from tvae_em.runtime import Stop, stop_on_signals

_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _model_default(name: str, preset: str | None = None):
    return option_default(ModelConfig, name, preset)


def _recipe(name: str, preset: str | None = None):
    """A training setting's default under a recipe (``config.TRAIN_PRESETS``), for the options and their help."""
    return option_default(TrainConfig, name, preset)


def _recipes(name: str) -> str:
    return "; ".join(f"{preset} {_recipe(name, preset)}" for preset in TRAIN_PRESETS)


_DEVICE = click.option("--device", default=_recipe("device"), show_default=True,
                       help="'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'.")
_DATADIR = click.option("--datadir", type=click.Path(file_okay=False),
                        help="Folder holding the stacks named in rlnImageName (tried as datadir/path, then "
                             "datadir/basename) when they are not relative to the STAR file; for a cryoSPARC .cs "
                             "file, the project directory.")
_AMP = click.option("--amp", type=click.Choice(AMP_MODES), default=_recipe("amp"), show_default=True,
                    help="bfloat16 autocast: 'auto' on CUDA GPUs and CPUs with AMX-BF16 units, 'bf16' always, "
                         "'off' for float32 throughout.")
_CLASS_NUMBER_HELP = ("With --clusters, the clusters also go to rlnClassNumber, which RELION's subset selection "
                      "reads; an input that has its own rlnClassNumber (an earlier classification) keeps it unless "
                      "'replace'. A note says which.")
_THREADS = click.option("--threads", type=click.IntRange(min=1),
                        help="CPUs to use, processes reading data included (default: the CPUs this process may use: "
                             "OMP_NUM_THREADS if set, else the smallest of the CPU affinity, the cgroup quota and "
                             "SLURM_CPUS_PER_TASK).")
_SHARD = click.option("--shard", metavar="I/N",
                       help="Process only shard I of N (0-based), a contiguous block of rows; combine the "
                            "parts with 'tvae-em merge'.")

_INDEX_FILES = ("a text file of integers separated by whitespace or commas, a .npy array or a .pkl as cryoDRGN "
                "writes its --ind files")
_IND = click.option("--ind", "--indices", "indices_file", type=click.Path(dir_okay=False),
                    help=f"Use only the particles of these 0-based rows of STAR ({_INDEX_FILES}); the output holds "
                         "only their rows, in input order, as 'tvae-em subset --ind' writes them. --shard divides "
                         "them.")



def _inference_options(command):
    """The options every command that runs the encoder over particles takes (embed, pose)."""
    for option in reversed([_IND, _SHARD, click.option("--batch-size", default=256, show_default=True), _DEVICE,
                            _AMP, _THREADS, _DATADIR]):
        command = option(command)
    return command

def _choose_level(ctx, param, value) -> None:
    """-q / -v, before or after the command's name: sets the verbosity (both together are refused)."""
    if not value:
        return
    level = console.QUIET if param.name == "quiet" else console.VERBOSE
    if ctx.meta.setdefault("tvae_em.level", level) != level:
        raise click.UsageError("-q and -v contradict each other: give one of them", ctx)
    console.set_level(level)


def _verbosity_options() -> list[click.Option]:
    return [click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_choose_level,
                         help="Only warnings and errors on stderr (no messages, no progress)."),
            click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_choose_level,
                         help="Also the details: device, configurations, input files.")]


class _Command(click.Command):
    """A subcommand that also takes -q / -v after its name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(_verbosity_options())


def _parse_shard(text):
    if text is None:
        return None
    from tvae_em.shards import parse_shard

    return parse_shard(text)


@click.group(context_settings=_SETTINGS, params=_verbosity_options())
@click.version_option(__version__, prog_name="tvae-em")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """TARGET-VAE for cryo-EM: rotation- and translation-invariant particle embeddings and in-plane poses.

    \b
    Typical pipeline:
      tvae-em preprocess particles.star -o prep/ -D 100
      tvae-em train prep/particles.star -o run/
      tvae-em embed run/ prep/particles.star -o embedded.star --clusters 5
      tvae-em pose run/ embedded.star -o posed.star
      tvae-em averages posed.star -o averages/
      tvae-em subset posed.star -o good.star --classes 1,3
      tvae-em render run/ -o render/ --grid 8
    """
    ctx.obj = {"debug": debug}


cli.command_class = _Command


@cli.command(context_settings=_SETTINGS)
@click.argument("star", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: particles.mrcs and particles.star are written there.")
@click.option("-D", "box", type=int, help="Fourier-crop the images to this box size (pixel size is updated).")
@click.option("--invert", is_flag=True, help="Invert contrast (make particles bright).")
@click.option("--normalize", type=click.Choice(["particle", "stack", "none"]), default="particle",
              show_default=True,
              help="Zero mean, unit std outside a circular mask, per particle or stack-wide.")
@click.option("--mask", is_flag=True, help="Apply a soft circular mask.")
@click.option("--phase-flip", is_flag=True,
              help="Multiply each image by the sign of its CTF (from the STAR's defocus values), the cheap CTF "
                   "correction; recorded as rlnCtfDataArePhaseFlipped, so that 'train --ctf auto' models |CTF|.")
@click.option("--picks", type=click.Path(dir_okay=False),
              help="Topaz picks (tab-separated table or STAR) to extract boxes from micrographs.")
@click.option("--micrographs", help="Glob of the micrograph MRC files the picks refer to, e.g. 'mics/*.mrc'.")
@click.option("--box", "extract_box", type=int, help="Box size (pixels) to extract around each pick.")
@click.option("--threshold", type=float, help="Keep only picks with score at or above this value.")
@click.option("--pick-scale", type=float,
              help="Multiply the pick coordinates by this factor: picks made on micrographs downsampled by it "
                   "(as Topaz's -x/--up-scale does; e.g. 8 after 'topaz preprocess -s 8'). The output STAR holds "
                   "the scaled coordinates. Default 1: picks made on the micrographs given.")
@click.option("--apix", type=float,
              help="Pixel size of the input images in Angstrom, replacing a wrong or missing one of the STAR file "
                   "(every optics group) or the MRC headers; the output carries it (times the -D cropping factor).")
@_DATADIR
def preprocess(star, out_dir, box, invert, normalize, mask, phase_flip, picks, micrographs, extract_box, threshold,
               pick_scale, apix, datadir):
    """Prepare particles for training: one float32 stack plus a RELION 3.1 STAR.

    Reads a RELION/Topaz particle STAR (or a cryoSPARC .cs, or a plain .mrcs) with its stacks, or Topaz picks with
    their micrographs; writes OUT/particles.mrcs and OUT/particles.star, which keeps every input column.

    \b
    Examples:
      tvae-em preprocess particles.star -o prep/ -D 100 --invert
      tvae-em preprocess --picks picks.txt --micrographs 'mics/*.mrc' --box 256 -D 64 -o prep/
      tvae-em preprocess --picks binned8.txt --pick-scale 8 --micrographs 'mics/*.mrc' --box 256 -o prep/
    """
    from tvae_em import preprocess as prep

    options = {"normalize": normalize, "invert": invert, "mask": mask}
    if picks:
        if star or not micrographs or not extract_box:
            raise UsageError("--picks needs --micrographs and --box, and no particle STAR argument")
        if phase_flip:
            raise UsageError("--phase-flip needs defocus values, which Topaz picks do not carry")
        path = prep.preprocess_picks(picks, micrographs, extract_box, out_dir, threshold=threshold,
                                     downsample=box, pixel_size=apix,
                                     pick_scale=1.0 if pick_scale is None else pick_scale, **options)
    elif star:
        pick_options = {"--micrographs": micrographs, "--box": extract_box, "--threshold": threshold,
                        "--pick-scale": pick_scale}
        given = [name for name, value in pick_options.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to Topaz picks (--picks), not to a particle file")
        path = prep.preprocess_star(star, out_dir, box=box, datadir=datadir, phase_flip=phase_flip,
                                    pixel_size=apix, **options)
    else:
        raise UsageError("give a particle STAR/MRCS file, or --picks with --micrographs and --box")
    console.note(f"wrote {path}")


@cli.command(context_settings=_SETTINGS)
@click.argument("star", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "run_dir", type=click.Path(file_okay=False),
              help="Run folder for checkpoints, log.csv and plots (required unless --resume).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this folder from its last complete epoch, with every option it was "
                   "started with. --epochs is then the new total (default: the run's), --device and --amp may "
                   "change; any other option given with a value unlike the run's is refused, naming it, since "
                   "it would change the model or the optimisation. A finished run is left as it is.")
@click.option("--rotations", default=_model_default("rotations"), show_default=True,
              help="Discrete rotations r of the P_r group.")
@click.option("--z-dim", default=_model_default("z_dim"), show_default=True,
              help="Dimension of the semantic latent z.")
@click.option("--encoder-fields", default=_model_default("encoder_fields"), show_default=True,
              help="Regular fields of the encoder.")
@click.option("--encoder-kernel", type=int, help="First-layer kernel (default 0.65 of the box, odd; it must be "
                                                 "larger than the particle).")
@click.option("--encoder-padding", type=int, help="First-layer padding (default 8/50 of the box).")
@click.option("--encoder-pointwise", type=click.Choice(POINTWISE_KINDS), default=_model_default("encoder_pointwise"),
              show_default=True,
              help="The encoder's 1x1 layers: full group convolutions, or one matrix shared by every rotation "
                   "(the authors' code; r times fewer multiply-adds, equally equivariant).")
@click.option("--generator-width", default=_model_default("generator_width"), show_default=True,
              help="Units per generator layer.")
@click.option("--generator-depth", default=_model_default("generator_depth"), show_default=True,
              help=f"Generator layers (paper: {_model_default('generator_depth', 'cryoem')} for cryo-EM, "
                   f"{_model_default('generator_depth', 'mnist')} for MNIST).")
@click.option("--fourier-features", default=_model_default("fourier_features"), show_default=True,
              help="Random Fourier features of the coordinates (0: plain coordinates).")
@click.option("--fourier-random-phase/--fourier-sin-cos", default=_model_default("fourier_random_phase"),
              show_default=True,
              help="Generator inputs: one cosine with a fixed random phase per Fourier feature (the authors' "
                   "code; half the inputs), or the cosine and sine of each.")
@click.option("--fourier-scale", default=_model_default("fourier_scale"), show_default=True,
              help="Std of the generator's random Fourier frequencies, in cycles per pixel.")
@click.option("--likelihood", type=click.Choice(LIKELIHOODS), default=_model_default("likelihood"),
              show_default=True, help="gaussian for cryo-EM (real-valued), bernoulli for binary images.")
@click.option("--rotation-prior", type=click.Choice(ROTATION_PRIORS), default=_model_default("rotation_prior"),
              show_default=True, help="p(r): uniform, or discretised N(0, (pi/4)^2) around 0.")
@click.option("--translation-prior-std", default=_model_default("translation_prior_std"), show_default=True,
              help="Std of p(t) in pixels.")
@click.option("--ctf", type=click.Choice(CTF_REQUESTS), default="auto", show_default=True,
              help="Multiply each posed generator image by the particle's CTF (from rlnDefocusU/V, "
                   "rlnDefocusAngle and the optics values) before comparing it with the image. auto: when the "
                   "STAR has defocus values (|CTF| for images phase flipped by 'preprocess --phase-flip'); on: "
                   "the same, but a STAR without them is an error; none: never.")
@click.option("--subpixel", is_flag=True, help="Add a continuous translation offset per cell (beyond the "
                                               "paper: sub-pixel shifts).")
@click.option("--preset", type=click.Choice(TRAIN_PRESETS), default="default", show_default=True,
              help=f"Training recipe the options below default to. default: batches of {_recipe('batch_size')}, "
                   f"{_recipe('epochs')} epochs, Adam at {_recipe('lr')}, frequency band opened coarse to fine "
                   f"over {_recipe('coarse_to_fine')} of them (measured in benchmarks/RESULTS.md). paper: batches "
                   f"of {_recipe('batch_size', 'paper')}, up to {_recipe('epochs', 'paper')} epochs, "
                   f"{_recipe('lr', 'paper')}, all frequencies from the start (section 4.1).")
@click.option("--batch-size", type=int, help=f"Particles per optimiser step ({_recipes('batch_size')}).")
@click.option("--epochs", type=int, help=f"Maximum epochs ({_recipes('epochs')}; with --resume the new total, "
                                         "default the run's); training stops early after "
                                         f"{_recipe('early_stop')} without improvement.")
@click.option("--lr", type=float, help=f"Adam learning rate ({_recipes('lr')}), halved after "
                                       f"{_recipe('patience_lr')} epochs without improvement.")
@click.option("--coarse-to-fine", type=float,
              help="Fraction of the epochs over which the frequency band of the generator's features and of "
                   f"the encoder's input opens from coarse to fine ({_recipes('coarse_to_fine')}: 0 lets all "
                   "frequencies through from the start).")
@click.option("--val-fraction", default=_recipe("val_fraction"), show_default=True,
              help="Random validation fraction (seeded).")
@click.option("--seed", default=_recipe("seed"), show_default=True)
@click.option("--ind", "--indices", "indices_file", type=click.Path(dir_okay=False),
              help=f"Train only on the particles of these 0-based rows of STAR ({_INDEX_FILES}). The run records "
                   "them (split.npz: input_rows); --resume uses them again and refuses others.")
@_DEVICE
@_AMP
@_THREADS
@_DATADIR
@click.pass_context
def train(ctx, star, run_dir, resume_dir, datadir, device, indices_file, **options):
    """Train TARGET-VAE on preprocessed particles.

    Reads a particle STAR (or .mrcs); writes RUN/checkpoint_last.pt, checkpoint_best.pt, log.csv,
    learning_curve.png, split.npz, config.json (command line, versions, inputs and every setting) and run.log
    (appended by each invocation: its command line and versions, then every message and epoch line, whatever
    -q or -v). Interrupt with Ctrl-C and continue with --resume, which takes every option from the run.

    \b
    Example:
      tvae-em train prep/particles.star -o run/ --z-dim 2 --epochs 100
      tvae-em train prep/particles.star --resume run/
      tvae-em train prep/particles.star --resume run/ --epochs 40
      tvae-em train prep/particles.star -o run2/ --ind good.pkl
    """
    from tvae_em import train as training

    if bool(run_dir) == bool(resume_dir):
        raise UsageError("give exactly one of -o RUN (new run) or --resume RUN")
    if resume_dir:
        requested = {key: value for key, value in options.items() if _given(ctx, key)}
        training.resume_from_star(star, resume_dir, {**requested, "device": device}, datadir=datadir,
                                  indices_file=indices_file)
        return
    preset, ctf = options.pop("preset"), options.pop("ctf")
    train_options, model_options = split_options({key: value for key, value in options.items() if value is not None})
    train_config = TrainConfig.preset(preset, device=device, **train_options)
    training.train_from_star(star, run_dir, train_config, model_options, datadir=datadir, ctf=ctf,
                             indices_file=indices_file)


def _given(ctx, name: str) -> bool:
    """Whether option ``name`` was given (on the command line or through the environment), not left at its
    default: on resume only those are compared with the run's."""
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


@cli.command(context_settings=_SETTINGS)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("star", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_star", required=True, type=click.Path(dir_okay=False),
              help="Output STAR: the input plus _tvaeZ.. columns (and _tvaeCluster, rlnClassNumber).")
@click.option("--clusters", type=int,
              help="Cluster the latents into this many groups: _tvaeCluster and rlnClassNumber 1..K, by size.")
@click.option("--method", type=click.Choice(["ward", "kmeans"]), default="ward", show_default=True,
              help="Clustering: agglomerative Ward (the paper's) or k-means.")
@click.option("--class-number", type=click.Choice(["keep", "replace"]), default="keep", show_default=True,
              help=_CLASS_NUMBER_HELP)
@_inference_options
def embed(run_dir, star, out_star, clusters, method, class_number, indices_file, shard, batch_size, device, amp,
          threads, datadir):
    """Write each particle's rotation/translation-invariant latent z into its STAR row.

    Reads a trained RUN folder and a particle STAR; writes OUT (input columns unchanged plus _tvaeZ01..,
    _tvaeZStd01.., and with --clusters _tvaeCluster and rlnClassNumber), OUT's _embedding.npz and a latent-space
    plot.

    \b
    Example:
      tvae-em embed run/ prep/particles.star -o embedded.star --clusters 5
    """
    from tvae_em import infer

    path = infer.embed(run_dir, star, out_star, clusters=clusters, method=method, shard=_parse_shard(shard),
                       batch_size=batch_size, device=device, amp=amp, datadir=datadir, class_number=class_number,
                       indices_file=indices_file, threads=threads)
    console.note(f"wrote {path}")


@cli.command(context_settings=_SETTINGS)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("star", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_star", required=True, type=click.Path(dir_okay=False),
              help="Output STAR: the input plus rlnAnglePsi, rlnOriginXAngst/YAngst and _tvaePose.. columns.")
@click.option("--replace-angles", is_flag=True,
              help="For a STAR from a 3-D refinement (rlnAngleRot/Tilt present): write the in-plane pose to "
                   "rlnAnglePsi and rlnOriginX/YAngst instead of keeping the refinement's and writing "
                   "_tvaeAnglePsi, _tvaeOriginX/YAngst.")
@_inference_options
def pose(run_dir, star, out_star, replace_angles, indices_file, shard, batch_size, device, amp, threads, datadir):
    """Infer each particle's in-plane rotation and shift, in RELION's convention.

    Reads a trained RUN folder and a particle STAR; writes OUT with rlnAnglePsi (deg), rlnOriginXAngst,
    rlnOriginYAngst, _tvaePoseEntropy, _tvaePoseMaxProb, _tvaePoseLocalMass, _tvaeSymmetryHint, plus a pose
    histogram plot, and says how many poses are uncertain (less than half of the posterior within 1 px and
    one rotation bin of the chosen pose).

    \b
    Example:
      tvae-em pose run/ prep/particles.star -o posed.star
    """
    from tvae_em import infer

    path = infer.pose(run_dir, star, out_star, shard=_parse_shard(shard), batch_size=batch_size,
                      device=device, amp=amp, datadir=datadir, replace_angles=replace_angles,
                      indices_file=indices_file, threads=threads)
    console.note(f"wrote {path}")


@cli.command(context_settings=_SETTINGS)
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_star", required=True, type=click.Path(dir_okay=False),
              help="The merged STAR, rows in the original order.")
@click.option("--clusters", type=int, help="Cluster the latents of every shard into this many groups "
                                           "(_tvaeCluster, rlnClassNumber); default: as given to 'embed --shard'.")
@click.option("--method", type=click.Choice(["ward", "kmeans"]),
              help="Clustering: agglomerative Ward (the paper's) or k-means; default: as given to embed.")
@click.option("--class-number", type=click.Choice(["keep", "replace"]),
              help=_CLASS_NUMBER_HELP + " Default: as given to embed.")
def merge(parts, out_star, clusters, method, class_number):
    """Merge the shard outputs of 'embed --shard' or 'pose --shard' into one STAR.

    Clustering needs every particle, so for embed shards it happens here: with the --clusters, --method and
    --class-number given to 'embed --shard', or with those given here.

    \b
    Example:
      tvae-em merge embedded.shard*of4.npz -o embedded.star --clusters 5
    """
    from tvae_em import infer

    path = infer.merge_shards(parts, out_star, clusters=clusters, method=method, class_number=class_number)
    console.note(f"wrote {path}")


_CLASS_COLUMN = click.option("--class-column", metavar="LABEL",
                             help="The column that holds the classes, e.g. rlnClassNumber or tvaeCluster "
                                  "(default: _tvaeCluster when present, else _rlnClassNumber).")


@cli.command(context_settings=_SETTINGS)
@click.argument("star", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: averages.mrcs, averages.star and averages.png.")
@_CLASS_COLUMN
@click.option("--ctf", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: when the STAR has defocus values, a Wiener-filtered average (each image weighted by its "
                   "CTF in its own frame, then aligned; divided by the sum of the aligned CTFs squared); none: the "
                   "plain aligned mean.")
@click.option("--wiener-constant", default=0.1, show_default=True,
              help="Added to the sum of CTF^2, per particle (the inverse SNR assumed): larger is smoother.")
@click.option("--batch-size", default=256, show_default=True, help="Images read at a time.")
@_DATADIR
def averages(star, out_dir, class_column, ctf, wiener_constant, batch_size, datadir):
    """Average the particles of each class, aligned by their in-plane poses.

    Reads a particle STAR with classes (_tvaeCluster or rlnClassNumber, from 'embed --clusters') and in-plane
    poses (rlnAnglePsi, rlnOriginX/YAngst from 'pose', or the _tvaeAnglePsi.. columns it writes beside a 3-D
    refinement's angles); each image is shifted by +origin and rotated by +psi, as RELION aligns it. Writes
    OUT/averages.mrcs (one image per class), OUT/averages.star (rlnImageName, rlnClassNumber,
    rlnClassDistribution, _tvaeParticleCount) and OUT/averages.png (a gallery with each class's number and count).

    \b
    Example:
      tvae-em pose run/ embedded.star -o posed.star
      tvae-em averages posed.star -o averages/
    """
    from tvae_em.averages import class_averages

    path = class_averages(star, out_dir, class_column, ctf=ctf, wiener_constant=wiener_constant,
                          datadir=datadir, batch_size=batch_size)
    console.note(f"wrote {path}")


@cli.command(context_settings=_SETTINGS)
@click.argument("star", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_star", required=True, type=click.Path(dir_okay=False),
              help="Output STAR: the chosen rows in their input order, with the optics table.")
@click.option("--classes", help="Class numbers to keep, e.g. 1,3 or 2-4.")
@_CLASS_COLUMN
@click.option("--indices", "--ind", "indices_file", type=click.Path(dir_okay=False),
              help=f"0-based row indices to keep: {_INDEX_FILES}.")
@click.option("--z-range", "z_ranges", multiple=True, metavar="DIM:LOW:HIGH",
              help="Keep particles whose latent _tvaeZ<DIM> (1-based) lies in [LOW, HIGH]; an empty bound is "
                   "open. Repeat for a box.")
@_DATADIR
def subset(star, out_star, classes, class_column, indices_file, z_ranges, datadir):
    """Write the particles chosen by class, by row index or by latent region to a new STAR.

    Every criterion given must hold. Rows keep their order and values; the optics table and any other block are
    kept (a RELION 3.0 input is converted to 3.1, which reads its stacks for the box size).

    \b
    Examples:
      tvae-em subset embedded.star -o good.star --classes 1,3
      tvae-em subset embedded.star -o region.star --z-range 1:-0.5:0.5 --z-range 2::0
      tvae-em subset particles.star -o kept.star --indices ind.pkl
    """
    from tvae_em import subset as selection

    path, chosen, total = selection.subset_star(
        star, out_star, classes=None if classes is None else selection.parse_classes(classes),
        indices_file=indices_file, z_ranges=[selection.parse_z_range(text) for text in z_ranges],
        class_column_label=class_column, datadir=datadir)
    console.note(f"kept {chosen} of {total} particles; wrote {path}")


@cli.command(context_settings=_SETTINGS)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: rendered.mrcs, rendered.star, montage.png.")
@click.option("--z", "z_text", help="Latent points 'a,b;c,d' (one point per ';').")
@click.option("--z-file", type=click.Path(exists=True, dir_okay=False),
              help="Latents from .npy/.npz/.csv or a STAR with _tvaeZ.. columns (as 'embed' writes). With --grid "
                   "they set its range (see --grid).")
@click.option("--grid", type=int,
              help="n x n traversal of z1 (left to right) and z2 (top to bottom, decreasing), like the paper's "
                   "figures: over the 1st to 99th percentile of the latents of --z-file (e.g. an embedded STAR) "
                   "or --z, with any further dimensions at their median; without them over -2..2 (the prior's "
                   "+-2 std), further dimensions at 0.")
@click.option("--centers-from", type=click.Path(exists=True, dir_okay=False),
              help="An embedded STAR with _tvaeCluster: render each cluster's mean latent.")
@click.option("--theta", "theta_deg", default=0.0, show_default=True, help="In-plane rotation (degrees).")
@click.option("--shift", "shift_px", nargs=2, type=float, default=(0.0, 0.0), show_default=True,
              help="Shift x y in pixels.")
@_DEVICE
def render(run_dir, out_dir, z_text, z_file, grid, centers_from, theta_deg, shift_px, device):
    """Generate images from the trained generator for chosen latents and poses.

    Reads a trained RUN folder; writes OUT/rendered.mrcs, OUT/rendered.star (one row per image with its latent,
    _tvaeZ01.., and pose) and OUT/montage.png (each panel captioned with its latent).

    \b
    Example:
      tvae-em render run/ -o render/ --grid 8 --z-file embedded.star
      tvae-em render run/ -o centres/ --centers-from embedded.star
    """
    from tvae_em import render as rendering

    z = _parse_points(z_text) if z_text else None
    path = rendering.render(run_dir, out_dir, z=z, z_file=z_file, grid=grid, theta_deg=theta_deg,
                            shift_px=shift_px, centers_from=centers_from, device=device)
    console.note(f"wrote {path}")


def _parse_points(text):
    import numpy as np

    try:
        return np.array([[float(v) for v in point.split(",")] for point in text.split(";")])
    except ValueError:
        raise UsageError(f"--z {text!r}: expected numbers like '0.5,-1;1,2'") from None


@cli.command(context_settings=_SETTINGS)
@click.option("-o", "--out", "out_dir", default="demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--particles", default=1500, show_default=True, help="Simulated particles.")
@click.option("--epochs", default=20, show_default=True)
@click.option("--snr", default=1.0, show_default=True, help="Signal-to-noise ratio of the simulated images.")
@click.option("--seed", default=0, show_default=True)
@_DEVICE
def demo(out_dir, particles, epochs, snr, seed, device):
    """Simulate particles of three objects and run the whole pipeline on them (no download).

    The particles are seen through a CTF (defocus 1.0-2.5 um with astigmatism, in RELION's columns), which
    training models. Writes OUT/sim (simulated stack + STAR with the true poses), OUT/prep, OUT/run, OUT/embedded.star,
    OUT/posed.star, OUT/render and plots; prints the rotation/translation correlation with the truth and the
    clustering accuracy.

    \b
    Example:
      tvae-em demo -o demo/
    """
    from tvae_em import demo as demo_run

    report = demo_run.run_demo(out_dir, n_particles=particles, epochs=epochs, snr=snr, seed=seed,
                               device=device)
    click.echo(report)


def main(argv=None):
    """Entry point: run the CLI, turning user errors into one stderr line and an exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    if not debug:  # a warning is one line for the user, not a Python source location
        warnings.formatwarning = _one_line_warning
    try:
        with console.invoked(["tvae-em", *args]), stop_on_signals():
            code = cli.main(args=argv, prog_name="tvae-em", standalone_mode=False)
    except click.UsageError as exc:  # click's own: unknown option, bad choice, missing argument
        where = exc.ctx.command_path if exc.ctx else "tvae-em"
        click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    except TvaeError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        code = exc.exit_code
    except Stop as stop:  # a signal outside the steps that describe their own interruption (training epochs)
        if debug:
            raise
        click.echo(f"error: {stop.name} received: stopped, no partial output left behind", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code or 0)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


if __name__ == "__main__":
    main()
