"""Inference over a particle stack with a trained model, as recipes: semantic embedding (``embed``), in-plane
poses (``pose``) and the merging of their shards (``merge_shards``).

Each run encodes the particles (``tvae_em.encode``: the MAP cell of q(t, r | y), paper section 3.2), turns the
encodings into new STAR columns (``tvae_em.io.columns``) and writes the input table with them, plus side outputs.

Shards. ``shard=(i, n)`` encodes only the shard's rows and saves their new columns (``tvae_em.shards``);
``merge_shards`` checks that the shards come from the same inputs and cover every row exactly once, puts them back
in input order and runs the same final step as an unsharded run: steps that need every particle (clustering,
``tvae_em.clustering``) happen there, with the clustering request of ``embed`` or one given to the merge. An
unsharded run takes the same path in memory, so merged and unsharded outputs are identical.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tvae_em import console, plots
from tvae_em.checkpoint import checkpoint_path, load_model, run_files
from tvae_em.clustering import check_method, cluster_latents, cluster_means
from tvae_em.device import resolve_device
from tvae_em.encode import encode_particles
from tvae_em.errors import InputError, UsageError
from tvae_em.io.atomic import atomic_path, atomic_paths, refuse_overwriting
from tvae_em.io.columns import (
    CLASS_COLUMN,
    CLUSTER_COLUMN,
    CONFIDENCE_COLUMN,
    ENTROPY_COLUMN,
    LATENT_STD_PREFIX,
    MAX_PROB_COLUMN,
    REFINEMENT_ANGLES,
    RELION_POSE,
    ROTATION_MASS_TOP_COLUMN,
    SYMMETRY_HINT_COLUMN,
    TVAE_POSE,
    z_columns,
)
from tvae_em.io.stack import open_particles
from tvae_em.io.star import write_star
from tvae_em.pose_quality import CONFIDENT_MASS, confidence_report, symmetry_hint
from tvae_em.poses import model_to_relion
from tvae_em.render import decode_at
from tvae_em.shards import (
    Results,
    check_inputs_unchanged,
    check_same_run,
    check_unchanged,
    combine,
    input_digests,
    shard_output_path,
    shard_rows,
)

# What embedding with clusters does to an input's own rlnClassNumber (an earlier classification); without one,
# the clusters are written to it either way.
CLASS_NUMBER_REQUESTS = ("keep", "replace")


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
    check_same_run(paths, parts, ignored=given)
    if given:
        request = {**source, **given}
        source = {**source, **clustering(request["clusters"] or None, request["method"], request["class_number"],
                                         request["seed"])}
    refuse_overwriting(output_paths(out_star, source["kind"]).values(),
                       [*paths, source["star_path"], *([source["indices"]] if source["indices"] else []),
                        *run_files(source["run_dir"])])
    check_inputs_unchanged(source)
    return _finish(combine(paths, parts, source), out_star)


def clustering(clusters, method="ward", class_number="keep", seed=0) -> dict:
    """The clustering request of an embedding (``Results.source`` fields), checked; ``clusters`` None or 0: none.
    """
    if clusters is not None:
        check_method(method)
        if clusters < 1:
            raise UsageError(f"the number of clusters must be at least 1, got {clusters}")
    if class_number not in CLASS_NUMBER_REQUESTS:
        raise UsageError(f"class_number must be one of {', '.join(CLASS_NUMBER_REQUESTS)}, not {class_number!r}")
    return {"clusters": int(clusters or 0), "method": method, "class_number": class_number, "seed": int(seed)}


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
    results.source.update(input_digests(star_path, indices, checkpoint_path(run_dir)))
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
            plots.pose_columns_figure(written["poses"], columns)
        write_star(written["star"], particles.table, pd.DataFrame(columns), block=particles.block)
    console.note(confidence_report(columns[CONFIDENCE_COLUMN]))
    if class_note:
        console.note(class_note)
    if TVAE_POSE[0] in columns:
        console.note(f"{source['star_path']} holds 3-D refinement angles ({', '.join(REFINEMENT_ANGLES)}): they "
                     f"and the refinement's psi and origins are kept; the in-plane poses are in "
                     f"_{', _'.join(TVAE_POSE)} (use --replace-angles to write them to {RELION_POSE[0]} and "
                     "rlnOriginX/YAngst instead)")
    return Path(out_star)


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
    columns.update(zip(z_columns(z_dim, LATENT_STD_PREFIX), encoded["z_std"].T, strict=True))
    columns[CONFIDENCE_COLUMN] = encoded["local_mass"]
    return columns


def _finish_embedding(columns, source, model, npz_path, figure_path) -> None:
    """Cluster the latent means (in place: adds the cluster column), then write the npz and the figure."""
    z_dim = model.config.z_dim
    z_mu = np.column_stack([columns[name] for name in z_columns(z_dim)])
    z_std = np.column_stack([columns[name] for name in z_columns(z_dim, LATENT_STD_PREFIX)])
    not_finite = np.flatnonzero(~np.isfinite(z_mu).all(1))
    if not_finite.size:
        raise InputError(source["star_path"], f"the latents of {not_finite.size} particles (first: row "
                                              f"{not_finite[0] + 1}) are NaN or infinite; check their images")
    arrays = {"z_mu": z_mu, "z_std": z_std, "rows": np.arange(len(z_mu))}
    labels = centers = images = None
    if source["clusters"]:
        labels = cluster_latents(z_mu, source["clusters"], source["method"], source["seed"])
        centers = cluster_means(z_mu, labels, range(1, source["clusters"] + 1))
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
            ENTROPY_COLUMN: encoded["entropy"], MAX_PROB_COLUMN: encoded["max_prob"],
            CONFIDENCE_COLUMN: encoded["local_mass"], SYMMETRY_HINT_COLUMN: np.where(located, symmetry_hint(mass), 0),
            ROTATION_MASS_TOP_COLUMN: mass.max(1)}
