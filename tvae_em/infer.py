"""Inference over a particle stack with a trained model: semantic embedding (``embed``) and in-plane poses
(``pose``), in batches and optionally in shards.

Only the encoder runs (the MAP cell of q(t, r | y), paper section 3.2, via ``TargetVAE.encode``); images are
streamed batch by batch so memory holds one batch (plus the one being read ahead) and the result arrays.

Shards. ``shard=(i, n)`` processes the contiguous rows [i L / n, (i + 1) L / n) of the L-row input and saves
its row-local results (the new STAR columns, at full precision) with their row indices and a fingerprint of
the inputs in an ``.npz``; ``merge_shards`` checks that the shards come from the same inputs and cover every
row exactly once, puts them back in input order and runs the same final step as an unsharded run: steps that
need every particle (clustering) happen there, with the clustering request of ``embed`` or one given to the
merge. An unsharded run takes the same path in memory, so merged and unsharded outputs are identical.
"""

import hashlib
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tvae_em import console, plots
from tvae_em.checkpoint import checkpoint_path, load_model, run_files
from tvae_em.device import bf16_autocast, bf16_autocast_enabled, plan_threads, resolve_device, torch_threads
from tvae_em.errors import InputError, UsageError
from tvae_em.io.atomic import atomic_path, atomic_paths, refuse_overwriting
from tvae_em.io.files import regular_file
from tvae_em.io.stack import open_particles
from tvae_em.io.star import write_star
from tvae_em.memory import FLOAT_BYTES, check_fits, model_bytes
from tvae_em.metrics import WARD_MAX_POINTS, cluster
from tvae_em.poses import model_to_relion
from tvae_em.render import CLUSTER_COLUMN, decode_at, z_columns

ENCODED_FIELDS = ("z_mu", "z_std", "theta", "t", "entropy", "rotation_mass", "max_prob", "local_mass",
                  "translation_mass")
RELION_POSE = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
TVAE_POSE = ("tvaeAnglePsi", "tvaeOriginXAngst", "tvaeOriginYAngst")  # beside a 3-D refinement's own angles
REFINEMENT_ANGLES = ("rlnAngleRot", "rlnAngleTilt")
CONFIDENCE_COLUMN = "tvaePoseLocalMass"
CONFIDENT_MASS = 0.5  # a pose is confident when this much of q(t, r | y) lies within 1 px and 1 bin of it
CLUSTER_METHODS = ("ward", "kmeans")
CLASS_COLUMN = "rlnClassNumber"  # RELION's class of a particle, which its subset selection and 3-D jobs read
# What embedding with clusters does to an input's own rlnClassNumber (an earlier classification); without one,
# the clusters are written to it either way.
CLASS_NUMBER_REQUESTS = ("keep", "replace")
_SHARD_FORMAT = 3  # 2: embed shards record the class_number request; 3: every shard its --ind file
# What a shard's ``source`` holds, with the type of each value (``Results``), for both kinds and for 'embed'.
_SOURCE_TYPES = {"kind": str, "star_path": str, "n_rows": int, "run_dir": str, "datadir": str,
                 "indices": str, "star_sha256": str, "indices_sha256": str, "model_sha256": str}
_KIND_SOURCE_TYPES = {"embed": {"clusters": int, "method": str, "class_number": str, "seed": int}, "pose": {}}


# --- encoding -----------------------------------------------------------------------------------------------

def encode_particles(model, particles, batch_size=256, device="auto", indices=None, amp="auto",
                     threads=None) -> dict:
    """Run the encoder over ``particles`` (all rows, or ``indices``) and return numpy arrays, one row each.

    ``amp``: bfloat16 autocast as in training (``device.bf16_autocast_enabled``); the poses and latents match
    float32's to bfloat16 rounding (tests/test_speed_paths.py).

    Keys: z_mu, z_std (n, Z); theta (n,) rad in [0, 2 pi); t (n, 2) model frame; entropy (n,) nats of
    q(t, r | y); rotation_mass (n, R); max_prob, local_mass, translation_mass (n,) (``PoseEstimate``). The
    next batch is read from disk while the current one is encoded, so at most two batches of images are in
    memory. ``threads``: CPUs for torch (default: those the process may use, ``device.cpu_budget``).
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    bf16 = bf16_autocast_enabled(amp, device)
    indices = np.arange(len(particles)) if indices is None else np.asarray(indices, dtype=np.int64)
    check_image_size(model, particles)
    check_fits(model_bytes(model.config, batch_size, activation_bytes=2 if bf16 else FLOAT_BYTES), device,
               f"encoding batches of {batch_size} particles", "use a smaller --batch-size")
    model.to(device).eval()
    model.encoder.export()
    cfg = model.config
    n = len(indices)
    results = {"z_mu": np.empty((n, cfg.z_dim), np.float32), "z_std": np.empty((n, cfg.z_dim), np.float32),
               "theta": np.empty(n, np.float32), "t": np.empty((n, 2), np.float32),
               "rotation_mass": np.empty((n, cfg.rotations), np.float32),
               **{name: np.empty(n, np.float32) for name in ("entropy", "max_prob", "local_mass",
                                                             "translation_mass")}}
    plan = plan_threads(threads)
    console.detail(f"encoding {n} particles on {device} in batches of {batch_size}, bfloat16 autocast "
                   f"{'on' if bf16 else 'off'}, {plan.describe()}")
    with ThreadPoolExecutor(max_workers=1) as reader, torch.no_grad(), torch_threads(plan.threads), \
            console.progress(n, "encoding", "particle") as progress:
        pending = reader.submit(particles.read, indices[:batch_size]) if n else None
        for start in range(0, n, batch_size):
            images = pending.result()
            following = start + batch_size
            if following < n:
                pending = reader.submit(particles.read, indices[following:following + batch_size])
            with bf16_autocast(device, bf16):
                estimate = model.encode(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))
            for name in ENCODED_FIELDS:
                results[name][start:start + len(images)] = getattr(estimate, name).float().cpu().numpy()
            progress.update(len(images))
    return results


def check_image_size(model, particles) -> None:
    """The encoder's translation grid is built for one box size; other boxes would give meaningless poses."""
    if particles.box != model.config.image_size:
        raise UsageError(f"the model was trained on {model.config.image_size} px images but the particles "
                         f"are {particles.box} px; preprocess them to the model's box first")


# --- shards -------------------------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0-based shard i of n) -> (i, n), with a UsageError for anything else."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"shard must look like i/n (e.g. 0/4), got {text!r}") from None
    check_shard((index, count))
    return index, count


def check_shard(shard) -> None:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard {index}/{count} does not exist: need n >= 1 and 0 <= i < n")


def shard_rows(n_rows: int, shard=None) -> np.ndarray:
    """Row indices of shard (i, n): the contiguous block [i L / n, (i + 1) L / n) of L rows (None: all)."""
    if shard is None:
        return np.arange(n_rows, dtype=np.int64)
    check_shard(shard)
    index, count = shard
    return np.arange(index * n_rows // count, (index + 1) * n_rows // count, dtype=np.int64)


def shard_output_path(out_star, shard) -> Path:
    """Where shard (i, n) of a run whose merged output is ``out_star`` saves its results."""
    out_star = Path(out_star)
    return out_star.with_name(f"{out_star.stem}.shard{shard[0]}of{shard[1]}.npz")


@dataclass
class Results:
    """New STAR columns for some rows of the input table, and the inputs and settings that produced them.

    ``columns`` maps STAR labels (without the leading underscore) to arrays aligned with ``rows``; ``source``
    holds the kind ('embed' or 'pose'), the input STAR path, the ``--ind`` file ('' for none) and the number of
    rows they give, the run directory, the image folder, the clustering request and, for shards, SHA-256 digests
    of the STAR, of the ``--ind`` file ('' for none) and of the model checkpoint, so that shards of different
    runs or inputs are never merged.
    """

    rows: np.ndarray
    columns: dict
    source: dict

    def save(self, path) -> None:
        arrays = {f"column:{name}": values for name, values in self.columns.items()}
        arrays.update({f"source:{key}": np.asarray(value) for key, value in self.source.items()})
        with atomic_path(path) as tmp:
            np.savez(tmp, rows=self.rows, format=np.asarray(_SHARD_FORMAT), **arrays)

    @classmethod
    def load(cls, path) -> "Results":
        """The results saved in ``path``; InputError if it is not a complete, consistent shard file."""
        path = regular_file(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if "format" not in data.files or int(data["format"]) != _SHARD_FORMAT:
                    raise InputError(path, "not a shard result of tvae-em embed/pose (or of another version)")
                columns = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("column:")}
                source = {k.split(":", 1)[1]: data[k].item() for k in data.files if k.startswith("source:")}
                results = cls(rows=data["rows"], columns=columns, source=source)
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as err:
            raise InputError(path, f"cannot read shard results: {err}") from None
        results._check(path)
        return results

    def _check(self, path) -> None:
        """Everything merging relies on: the source fields and their types, integer rows inside the input, and
        one value per row in every column."""
        kind = self.source.get("kind")
        if kind not in _KIND_SOURCE_TYPES:
            raise InputError(path, f"shard results of an unknown kind {kind!r}")
        for key, kind_of_value in {**_SOURCE_TYPES, **_KIND_SOURCE_TYPES[kind]}.items():
            if not isinstance(self.source.get(key), kind_of_value):
                raise InputError(path, f"incomplete shard results: {key} missing or not a {kind_of_value.__name__}")
        rows, n_rows = self.rows, self.source["n_rows"]
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and not 0 <= rows.min() <= rows.max() < n_rows):
            raise InputError(path, f"shard rows are not indices into the {n_rows} rows of the input STAR")
        if not self.columns or any(values.shape != rows.shape for values in self.columns.values()):
            raise InputError(path, "shard results without one value per row in every column")


def merge_shards(shard_outputs, out_star, clusters=None, method=None, class_number=None) -> Path:
    """Combine the shard results of one embed or pose run into ``out_star`` (rows in input order).

    ``clusters``, ``method`` and ``class_number``, when given, replace the clustering request the embed shards
    were made with (as ``embed`` takes them); the shards may then differ in it.

    Raises InputError when the shards come from different inputs or settings, when the input STAR changed
    since they were made, or when any row is missing or appears more than once; UsageError for a clustering
    request on pose shards.
    """
    paths = [Path(p) for p in shard_outputs]
    if not paths:
        raise UsageError("no shard results to merge")
    refuse_overwriting([out_star], paths)
    parts = [Results.load(p) for p in paths]
    source = parts[0].source
    given = {key: value for key, value in {"clusters": clusters, "method": method, "class_number": class_number}.items()
             if value is not None}
    if given and source["kind"] != "embed":
        raise UsageError(f"{paths[0]} holds results of '{source['kind']}': only embed shards can be clustered")
    for path, part in zip(paths[1:], parts[1:], strict=True):
        if part.source["kind"] != source["kind"]:
            raise InputError(path, f"a shard of '{part.source['kind']}', but {paths[0]} is one of "
                                   f"'{source['kind']}'")
        changed = sorted(k for k in source.keys() | part.source.keys()
                         if k not in given and part.source.get(k) != source.get(k))
        if part.columns.keys() != parts[0].columns.keys():
            changed.append("columns")
        if changed:
            raise InputError(path, f"made from other inputs or settings than {paths[0]} (differs in "
                                   f"{', '.join(changed)})")
    if given:
        request = {**source, **given}
        source = {**source, **clustering(request["clusters"] or None, request["method"], request["class_number"],
                                         request["seed"])}
    refuse_overwriting(output_paths(out_star, source["kind"]).values(),
                       [*paths, source["star_path"], *([source["indices"]] if source["indices"] else []),
                        *run_files(source["run_dir"])])
    check_unchanged(source["star_path"], source["star_sha256"], "the input STAR")
    if source["indices"]:
        check_unchanged(source["indices"], source["indices_sha256"], "the --ind file")
    rows = np.concatenate([part.rows for part in parts])
    _check_coverage(rows, source["n_rows"], paths, parts)
    order = np.argsort(rows, kind="stable")
    columns = {name: np.concatenate([part.columns[name] for part in parts])[order]
               for name in parts[0].columns}
    return _finish(Results(rows=rows[order], columns=columns, source=source), out_star)


def clustering(clusters, method="ward", class_number="keep", seed=0) -> dict:
    """The clustering request of an embedding (``Results.source`` fields), checked; ``clusters`` None or 0: none.
    """
    if clusters is not None and method not in CLUSTER_METHODS:
        raise UsageError(f"unknown clustering method {method!r}; expected 'ward' or 'kmeans'")
    if clusters is not None and clusters < 1:
        raise UsageError(f"the number of clusters must be at least 1, got {clusters}")
    if class_number not in CLASS_NUMBER_REQUESTS:
        raise UsageError(f"class_number must be one of {', '.join(CLASS_NUMBER_REQUESTS)}, not {class_number!r}")
    return {"clusters": int(clusters or 0), "method": method, "class_number": class_number, "seed": int(seed)}


def _check_coverage(rows, n_rows, paths, parts) -> None:
    counts = np.bincount(rows, minlength=n_rows) if len(rows) else np.zeros(n_rows, np.int64)
    if len(counts) > n_rows:
        raise InputError(paths[0], f"shard rows go beyond the {n_rows} rows of the input STAR")
    missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if len(repeated):
        owners = [str(p) for p, part in zip(paths, parts, strict=True) if np.isin(part.rows, repeated).any()]
        raise InputError(owners[0], f"{len(repeated)} rows (first: {repeated[0]}) appear more than once, "
                                    f"in {', '.join(owners)}")
    if len(missing):
        raise InputError(paths[0], f"{len(missing)} of {n_rows} rows (first: {missing[0]}) are in none of "
                                   f"the {len(paths)} shards given")


def check_unchanged(path, sha256: str, what: str) -> None:
    """InputError unless ``path`` still holds the file the shards were computed from (SHA-256 ``sha256``)."""
    if not Path(path).is_file():
        raise InputError(path, f"{what} of the shards is gone (moved or deleted since they were computed); "
                               "put it back or rerun the shards")
    if file_sha256(path) != sha256:
        raise InputError(path, f"{what} changed since the shards were computed; rerun them")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- embed and pose -----------------------------------------------------------------------------------------

def embed(run_dir, star_path, out_star, clusters=None, method="ward", shard=None, batch_size=256,
          device="auto", datadir=None, seed=0, amp="auto", class_number="keep", indices_file=None,
          threads=None) -> Path:
    """Semantic latents of every particle: ``_tvaeZ01..`` (posterior means of z at the MAP cell) and
    ``_tvaeZStd01..`` added to a copy of ``star_path``, ``<stem>_embedding.npz`` and ``<stem>_latent.png``.

    With ``clusters`` = k, the means are clustered (Ward as in section 4.3 of the paper, or k-means) into
    ``_tvaeCluster`` 1..k, numbered by decreasing size, and the same numbers go to RELION's ``rlnClassNumber``;
    an input that has its own (an earlier classification) keeps it unless ``class_number`` is 'replace', and a
    note on stderr says which. With ``shard`` = (i, n) only the shard's rows are encoded and saved to
    ``shard_output_path(out_star, shard)`` (returned); ``merge_shards`` does the rest. With ``indices_file``
    (cryoDRGN's ``--ind``) only the particles of the rows it lists are embedded, and the output holds only them,
    in input order; shards divide those.
    """
    settings = {"kind": "embed", **clustering(clusters, method, class_number, seed)}
    return _run(run_dir, star_path, out_star, shard, settings, _embed_columns, batch_size=batch_size, device=device,
                amp=amp, datadir=datadir, indices_file=indices_file, threads=threads)


def pose(run_dir, star_path, out_star, shard=None, batch_size=256, device="auto", datadir=None,
         amp="auto", replace_angles=False, indices_file=None, threads=None) -> Path:
    """In-plane poses of every particle in RELION's convention (``rlnAnglePsi``, ``rlnOriginXAngst``,
    ``rlnOriginYAngst``, replacing any the input had, with each particle's own pixel size) in a copy of
    ``star_path``, plus ``<stem>_poses.png``, and what the posterior says about their reliability:

    - ``_tvaePoseEntropy``: entropy of q(t, r | y) in nats (0: one certain cell);
    - ``_tvaePoseMaxProb``: q of the chosen (t, r) cell;
    - ``_tvaePoseLocalMass``: q within one pixel and one rotation bin of the chosen cell; below
      ``CONFIDENT_MASS`` the pose is counted as uncertain (see ``confidence_report``);
    - ``_tvaeRotationMassTop``: the largest q(r | y) = sum over t of q(t, r | y), how sharply one
      rotation bin is preferred;
    - ``_tvaeSymmetryHint``: the cyclic order that best explains q(r | y) (``symmetry_hint``), or 0 where the
      particle is not located (q(t | y) within one pixel of the chosen position below ``CONFIDENT_MASS``).

    An input from a 3-D refinement (``rlnAngleRot`` / ``rlnAngleTilt``) keeps its angles and origins: an
    in-plane psi would not mean the same thing beside them. The in-plane pose then goes to ``_tvaeAnglePsi``,
    ``_tvaeOriginXAngst`` and ``_tvaeOriginYAngst``, unless ``replace_angles``. Sharding and ``indices_file`` as
    in ``embed``.
    """
    settings = {"kind": "pose", "replace_angles": bool(replace_angles)}
    return _run(run_dir, star_path, out_star, shard, settings, _pose_columns, batch_size=batch_size,
                device=device, amp=amp, datadir=datadir, indices_file=indices_file, threads=threads)


def _run(run_dir, star_path, out_star, shard, settings, make_columns, *, batch_size, device, amp, datadir,
         indices_file=None, threads=None) -> Path:
    """Encode the (shard's) rows, turn the encodings into columns, then save the shard or finish the run."""
    star_path, out_star = Path(star_path).resolve(), Path(out_star)
    indices = "" if indices_file is None else str(Path(indices_file).resolve())
    outputs = [shard_output_path(out_star, shard)] if shard else output_paths(out_star, settings["kind"]).values()
    refuse_overwriting(outputs, [star_path, *([indices] if indices else []), *run_files(run_dir)])
    model, _ = load_model(run_dir, map_location=resolve_device(device))
    particles = open_particles(star_path, datadir=datadir, indices_file=indices or None)
    refuse_overwriting(outputs, particles.stack_paths)
    rows = shard_rows(len(particles), shard)
    encoded = encode_particles(model, particles, batch_size, device, rows, amp, threads)
    source = {**settings, "star_path": str(star_path), "indices": indices, "n_rows": len(particles),
              "run_dir": str(Path(run_dir).resolve()),
              "datadir": "" if datadir is None else str(Path(datadir).resolve())}
    results = Results(rows=rows, columns=make_columns(encoded, particles, rows, settings), source=source)
    if shard is None:
        return _finish(results, out_star, model=model, particles=particles)
    results.source["star_sha256"] = file_sha256(star_path)
    results.source["indices_sha256"] = file_sha256(indices) if indices else ""
    results.source["model_sha256"] = file_sha256(checkpoint_path(run_dir))
    path = shard_output_path(out_star, shard)
    results.save(path)
    return path


def _finish(results: Results, out_star, model=None, particles=None) -> Path:
    """The step that needs every row: global analysis, then the output STAR and its side outputs, all or none.

    Without ``model`` and ``particles`` (merging shards) both are loaded from the source the shards recorded,
    after checking that the run's checkpoint is still the one they were computed with.
    """
    source = results.source
    outputs = output_paths(out_star, source["kind"])
    if particles is None:
        particles = open_particles(source["star_path"], datadir=source["datadir"] or None,
                                   indices_file=source["indices"] or None)
        refuse_overwriting(outputs.values(), particles.stack_paths)
    if source["kind"] == "embed" and model is None:
        checkpoint = checkpoint_path(source["run_dir"])
        check_unchanged(checkpoint, source["model_sha256"], "the model checkpoint")
        model, _ = load_model(checkpoint, map_location=torch.device("cpu"))
    columns, class_note = dict(results.columns), None
    with atomic_paths(*outputs.values()) as temporaries:
        written = dict(zip(outputs, temporaries, strict=True))
        if source["kind"] == "embed":
            _finish_embedding(columns, source, model, written["embedding"], written["latent"])
            class_note = _add_class_numbers(columns, particles, source)
        else:
            _pose_figure(columns, written["poses"])
        write_star(written["star"], particles.table, pd.DataFrame(columns), block=particles.block)
    console.note(confidence_report(columns[CONFIDENCE_COLUMN]))
    if class_note:
        console.note(class_note)
    if TVAE_POSE[0] in columns:
        console.note(f"{source['star_path']} holds 3-D refinement angles ({', '.join(REFINEMENT_ANGLES)}): they "
                     f"and the refinement's psi and origins are kept; the in-plane poses are in "
                     f"_{', _'.join(TVAE_POSE)} (use --replace-angles to write them to rlnAnglePsi and "
                     "rlnOriginX/YAngst instead)")
    return Path(out_star)


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


def output_paths(out_star, kind: str) -> dict[str, Path]:
    """Every file an unsharded ``kind`` run (or a merge) writes, by role: the STAR and, beside it and named
    after it (<stem>_<role><suffix>), its side outputs."""
    out_star = Path(out_star)
    sides = {"embed": {"embedding": ".npz", "latent": ".png"}, "pose": {"poses": ".png"}}[kind]
    return {"star": out_star, **{role: out_star.with_name(f"{out_star.stem}_{role}{suffix}")
                                 for role, suffix in sides.items()}}


# --- embedding ----------------------------------------------------------------------------------------------

def _embed_columns(encoded, particles, rows, settings) -> dict:
    z_dim = encoded["z_mu"].shape[1]
    columns = dict(zip(z_columns(z_dim), encoded["z_mu"].T, strict=True))
    columns.update(zip(z_columns(z_dim, "tvaeZStd"), encoded["z_std"].T, strict=True))
    columns[CONFIDENCE_COLUMN] = encoded["local_mass"]
    return columns


def _finish_embedding(columns, source, model, npz_path, figure_path) -> None:
    """Cluster the latent means (in place: adds the cluster column), then write the npz and the figure."""
    z_dim = model.config.z_dim
    z_mu = np.column_stack([columns[name] for name in z_columns(z_dim)])
    z_std = np.column_stack([columns[name] for name in z_columns(z_dim, "tvaeZStd")])
    not_finite = np.flatnonzero(~np.isfinite(z_mu).all(1))
    if not_finite.size:
        raise InputError(source["star_path"], f"the latents of {not_finite.size} particles (first: row "
                                              f"{not_finite[0] + 1}) are NaN or infinite; check their images")
    arrays = {"z_mu": z_mu, "z_std": z_std, "rows": np.arange(len(z_mu))}
    labels = centers = images = None
    if source["clusters"]:
        labels = cluster_latents(z_mu, source["clusters"], source["method"], source["seed"])
        centers = np.stack([z_mu[labels == k].mean(0) for k in range(1, source["clusters"] + 1)])
        images = decode_at(model, centers)
        columns[CLUSTER_COLUMN] = labels
        arrays.update(cluster=labels, cluster_centers=centers)
    with atomic_path(npz_path) as tmp:
        np.savez(tmp, **arrays)
    plots.latent_figure(figure_path, z_mu, labels, centers, images, title="posterior means of z",
                        seed=source["seed"])


def _add_class_numbers(columns, particles, source) -> str | None:
    """Copy the clusters to ``rlnClassNumber`` (in ``columns``) unless the input has its own and the request keeps
    it; a one-line note when the input had one, saying what became of it."""
    if CLUSTER_COLUMN not in columns:
        return None
    had_classes = CLASS_COLUMN in particles.table[particles.block].columns
    if had_classes and source["class_number"] == "keep":
        return (f"note: {source['star_path']} has its own {CLASS_COLUMN} (an earlier classification): kept; the "
                f"{source['clusters']} clusters are in _{CLUSTER_COLUMN} only (--class-number replace writes them "
                f"to {CLASS_COLUMN} too)")
    columns[CLASS_COLUMN] = columns[CLUSTER_COLUMN]
    if had_classes:
        return (f"note: the {CLASS_COLUMN} of {source['star_path']} (an earlier classification) is replaced by the "
                f"{source['clusters']} clusters of _{CLUSTER_COLUMN}")
    return None


def cluster_latents(z, k, method="ward", seed=0) -> np.ndarray:
    """Cluster labels 1..k, numbered by decreasing cluster size (equal sizes keep the clustering's order).

    Ward clustering needs memory quadratic in the number of points, so above ``WARD_MAX_POINTS`` it is fit
    on a seeded random subsample of that size; the subsample keeps its Ward labels and every other point
    joins the cluster with the nearest centroid (Euclidean, like Ward's variance criterion).
    """
    z = np.asarray(z, dtype=np.float64)
    if method == "ward" and len(z) > WARD_MAX_POINTS:
        sample = np.sort(np.random.default_rng(seed).choice(len(z), WARD_MAX_POINTS, replace=False))
        sample_labels = cluster(z[sample], k, method="ward", seed=seed)
        centroids = np.stack([z[sample][sample_labels == c].mean(0) for c in range(k)])
        labels = nearest_centroid(z, centroids)
        labels[sample] = sample_labels
    else:
        labels = cluster(z, k, method=method, seed=seed)
    return _number_by_size(labels, k)


def nearest_centroid(points, centroids, chunk=65_536) -> np.ndarray:
    """Index of the closest centroid for every point, in chunks so that memory stays O(chunk * k)."""
    labels = np.empty(len(points), dtype=np.int64)
    for start in range(0, len(points), chunk):
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, and |p|^2 does not change which centroid is nearest
        distances = (centroids ** 2).sum(1) - 2 * points[start:start + chunk] @ centroids.T
        labels[start:start + chunk] = distances.argmin(1)
    return labels


def _number_by_size(labels, k) -> np.ndarray:
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(1, k + 1)
    return rank[labels]


# --- poses --------------------------------------------------------------------------------------------------

def _pose_columns(encoded, particles, rows, settings) -> dict:
    psi_deg, origin_x, origin_y = model_to_relion(encoded["theta"].astype(np.float64),
                                                  encoded["t"].astype(np.float64), particles.box,
                                                  particles.pixel_sizes[rows])
    refined = any(label in particles.table[particles.block].columns for label in REFINEMENT_ANGLES)
    names = TVAE_POSE if refined and not settings["replace_angles"] else RELION_POSE
    mass = encoded["rotation_mass"]
    located = encoded["translation_mass"] >= CONFIDENT_MASS
    return {**dict(zip(names, (psi_deg, origin_x, origin_y), strict=True)),
            "tvaePoseEntropy": encoded["entropy"], "tvaePoseMaxProb": encoded["max_prob"],
            CONFIDENCE_COLUMN: encoded["local_mass"], "tvaeSymmetryHint": np.where(located, symmetry_hint(mass), 0),
            "tvaeRotationMassTop": mass.max(1)}


def _pose_figure(columns, figure_path) -> None:
    psi, origin_x, origin_y = (columns[name] for name in (TVAE_POSE if TVAE_POSE[0] in columns else RELION_POSE))
    plots.pose_figure(figure_path, psi_deg=psi, origin_x_angst=origin_x, origin_y_angst=origin_y,
                      entropy_nats=columns["tvaePoseEntropy"], local_mass=columns[CONFIDENCE_COLUMN],
                      symmetry_hint=columns["tvaeSymmetryHint"])


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
