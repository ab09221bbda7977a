"""Topaz particle picks and the boxes they define on the micrographs.

Two formats are read: Topaz's tab-separated table (``image_name x_coord y_coord score``) and its STAR
output (``rlnMicrographName rlnCoordinateX rlnCoordinateY rlnAutopickFigureOfMerit``).  Both become one
text table with the RELION labels, other columns kept.  Coordinates are micrograph pixels: x is the
column, y the row; the box of size B around a pick has its centre pixel (B//2, B//2) on
(round(y), round(x)), as RELION extracts it. Picks made on micrographs downsampled by a factor F (Topaz usually
picks on binned micrographs) have their coordinates multiplied by F, as ``topaz convert -x F`` does.
"""

import glob
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from tvae_em.errors import InputError, UsageError
from tvae_em.io.files import regular_file
from tvae_em.io.mrc import MrcHeader, map_data, read_mrc_header, warn_unstamped
from tvae_em.io.star import StarBlock, StarFile, first_statement, format_values, numeric_column, read_star

TOPAZ_TO_RELION = {"image_name": "rlnMicrographName", "x_coord": "rlnCoordinateX",
                   "y_coord": "rlnCoordinateY", "score": "rlnAutopickFigureOfMerit"}
SCORE = "rlnAutopickFigureOfMerit"
_REQUIRED = ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY")
_NAMED_MICROGRAPHS = 3  # a note names up to this many micrographs, and counts them beyond


def read_picks(path, threshold: float | None = None,
               scale: float = 1.0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Picks with score >= ``threshold``: (text table with RELION labels, x (n,), y (n,)) in file order, the
    coordinates (and their cells) multiplied by ``scale``: picks made on micrographs downsampled by ``scale``."""
    if not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"--pick-scale {scale}: the coordinate scale must be a positive, finite number")
    path = regular_file(path)
    star = read_star(path) if _looks_like_star(path) else _read_topaz_table(path)
    block = next((name for name, item in star.blocks.items()
                  if item.loop and all(label in item.data.columns for label in _REQUIRED)), None)
    if block is None:
        raise InputError(path, "no table with micrograph name and x, y coordinate columns")
    table = star[block]
    x = numeric_column(star, block, "rlnCoordinateX")
    y = numeric_column(star, block, "rlnCoordinateY")
    not_finite = np.flatnonzero(~(np.isfinite(x) & np.isfinite(y)))
    if not_finite.size:
        row = int(not_finite[0])
        raise InputError(path, f"row {row + 1}: coordinates x={table['rlnCoordinateX'].iloc[row]}, "
                               f"y={table['rlnCoordinateY'].iloc[row]} are not finite numbers")
    if threshold is not None:
        if SCORE not in table.columns:
            raise UsageError(f"a score threshold was given but {path} has no score column")
        keep = numeric_column(star, block, SCORE) >= threshold
        table, x, y = table[keep].reset_index(drop=True), x[keep], y[keep]
    if scale != 1:
        x, y = x * scale, y * scale
        table = table.assign(rlnCoordinateX=format_values(x), rlnCoordinateY=format_values(y))
    return table, x, y


def _looks_like_star(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            first = first_statement(stream)
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from None
    if first is None:
        raise InputError(path, "empty picks file")
    return first.startswith(b"data_")


def _read_topaz_table(path: Path) -> StarFile:
    try:
        table = pd.read_csv(path, sep=r"\s+", dtype=str, keep_default_na=False, na_filter=False, comment="#")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(path, f"not a Topaz picks table ({str(err).strip()})") from None
    missing = [name for name in ("image_name", "x_coord", "y_coord") if name not in table.columns]
    if missing:
        raise InputError(path, f"Topaz picks table lacks column(s) {', '.join(missing)}")
    table = table.rename(columns=TOPAZ_TO_RELION)
    return StarFile({"picks": StarBlock("picks", table)}, path)


def match_micrographs(picks_path, names: pd.Series, pattern: str) -> tuple[list[Path], np.ndarray]:
    """Micrograph file of every pick: its name matched to the files of ``pattern`` by file name, then stem.

    Returns (unique micrograph paths, index into them per pick).
    """
    files = sorted(Path(f) for f in glob.glob(str(pattern), recursive=True) if Path(f).is_file())
    if not files:
        raise UsageError(f"no micrograph file matches '{pattern}'")
    by_name = {f.name: f for f in files}
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)
    codes, unique = pd.factorize(names)
    paths = []
    for code, name in enumerate(unique):
        base = Path(name).name
        found = [by_name[base]] if base in by_name else by_stem.get(base) or by_stem.get(Path(base).stem, [])
        if len(found) != 1:
            row = int(np.argmax(codes == code)) + 1
            problem = "matches several files" if found else f"not among the {len(files)} files matching"
            raise InputError(picks_path, f"row {row}: micrograph {name!r} {problem} '{pattern}'")
        paths.append(found[0])
    return paths, codes


def box_corners(x, y, box: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left (row, col) of the box centred on each pick (RELION rounds coordinates half up)."""
    centre_row = np.floor(np.asarray(y, dtype=np.float64) + 0.5).astype(np.int64)
    centre_col = np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)
    return centre_row - box // 2, centre_col - box // 2


class PickedBoxes:
    """Boxes cut from memory-mapped micrographs, served like ``Particles.read``.

    Picks whose box falls (partly) off the micrograph are dropped; ``kept`` tells which input rows remain.
    """

    _OPEN_MAPS = 4

    def __init__(self, micrographs: list[Path], mic_id: np.ndarray, x, y, box: int):
        self.headers = [_micrograph_header(path) for path in micrographs]
        warn_unstamped(self.headers)
        self.box = box
        rows, cols = box_corners(x, y, box)
        heights = np.array([h.shape[1] for h in self.headers])[mic_id]
        widths = np.array([h.shape[2] for h in self.headers])[mic_id]
        self.kept = (rows >= 0) & (cols >= 0) & (rows + box <= heights) & (cols + box <= widths)
        self._mic, self._rows, self._cols = mic_id[self.kept], rows[self.kept], cols[self.kept]
        self._dropped_on = np.unique(mic_id[~self.kept])
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return len(self._mic)

    def edge_note(self) -> str | None:
        """One line on the picks left out because their box crosses the micrograph's edge (None if none is)."""
        dropped = len(self.kept) - len(self)
        if not dropped:
            return None
        mics = self._dropped_on
        where = (", ".join(self.headers[m].path.name for m in mics) if len(mics) <= _NAMED_MICROGRAPHS
                 else f"{len(mics)} of {len(self.headers)} micrographs")
        return (f"note: {dropped} of {len(self.kept)} picks left out: their {self.box} px box crosses the edge of "
                f"the micrograph (on {where})")

    @property
    def micrograph_pixel_size(self) -> float:
        return self.headers[0].pixel_size

    def read(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((indices.size, self.box, self.box), dtype=np.float32)
        for k, i in enumerate(indices):
            row, col = self._rows[i], self._cols[i]
            out[k] = self._map(int(self._mic[i]))[0, row:row + self.box, col:col + self.box]
            if not np.isfinite(out[k]).all():
                centre = self.box // 2
                raise InputError(self.headers[self._mic[i]].path,
                                 f"NaN or inf pixels in the box at x={col + centre}, y={row + centre}")
        return out

    def _map(self, mic: int) -> np.memmap:
        if mic not in self._maps:
            if len(self._maps) >= self._OPEN_MAPS:
                self._maps.popitem(last=False)
            self._maps[mic] = map_data(self.headers[mic])
        return self._maps[mic]


def _micrograph_header(path: Path) -> MrcHeader:
    header = read_mrc_header(path)
    if header.shape[0] != 1:
        raise InputError(path, f"{header.shape[0]} sections; expected one (motion-corrected) micrograph")
    return header
