"""Shards of an ``embed`` or ``pose`` run: which rows a shard holds, the ``.npz`` format its results are saved in
(``Results``), and the checks that shards may be merged: made from the same inputs and settings, inputs unchanged
since, every row exactly once.

Shard (i, n) holds the contiguous rows [i L / n, (i + 1) L / n) of the L-row input; its results are the new STAR
columns of those rows at full precision, with their row indices and SHA-256 digests of the inputs.
"""

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvae_em.errors import InputError, UsageError
from tvae_em.io.atomic import atomic_path
from tvae_em.io.files import regular_file

_SHARD_FORMAT = 3  # 2: embed shards record the class_number request; 3: every shard its --ind file
# What a shard's ``source`` holds, with the type of each value (``Results``), for both kinds and for 'embed'.
_SOURCE_TYPES = {"kind": str, "star_path": str, "n_rows": int, "run_dir": str, "datadir": str,
                 "indices": str, "star_sha256": str, "indices_sha256": str, "model_sha256": str}
_KIND_SOURCE_TYPES = {"embed": {"clusters": int, "method": str, "class_number": str, "seed": int}, "pose": {}}


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


def check_same_run(paths, parts, ignored=()) -> None:
    """InputError unless every shard is of the kind of the first, made from the same inputs and settings (except
    those named in ``ignored``) and holds the same columns."""
    source = parts[0].source
    for path, part in zip(paths[1:], parts[1:], strict=True):
        if part.source["kind"] != source["kind"]:
            raise InputError(path, f"a shard of '{part.source['kind']}', but {paths[0]} is one of "
                                   f"'{source['kind']}'")
        changed = sorted(k for k in source.keys() | part.source.keys()
                         if k not in ignored and part.source.get(k) != source.get(k))
        if part.columns.keys() != parts[0].columns.keys():
            changed.append("columns")
        if changed:
            raise InputError(path, f"made from other inputs or settings than {paths[0]} (differs in "
                                   f"{', '.join(changed)})")


def input_digests(star_path, indices, model_path) -> dict:
    """The SHA-256 digests of its inputs a shard records (``indices``: the ``--ind`` file, '' for none)."""
    return {"star_sha256": file_sha256(star_path), "indices_sha256": file_sha256(indices) if indices else "",
            "model_sha256": file_sha256(model_path)}


def check_inputs_unchanged(source) -> None:
    """InputError unless the input STAR and the ``--ind`` file are still those the shards were computed from."""
    check_unchanged(source["star_path"], source["star_sha256"], "the input STAR")
    if source["indices"]:
        check_unchanged(source["indices"], source["indices_sha256"], "the --ind file")


def combine(paths, parts, source) -> Results:
    """The shards' results as one, rows in input order, with ``source``; InputError unless they hold every row of
    the input exactly once."""
    rows = np.concatenate([part.rows for part in parts])
    check_coverage(rows, source["n_rows"], paths, parts)
    order = np.argsort(rows, kind="stable")
    columns = {name: np.concatenate([part.columns[name] for part in parts])[order]
               for name in parts[0].columns}
    return Results(rows=rows[order], columns=columns, source=source)


def check_coverage(rows, n_rows, paths, parts) -> None:
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
