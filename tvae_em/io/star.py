"""Read and write STAR files (RELION 3.0 to 5.0, Topaz) without changing a character of the input values.

Every cell is kept as the text it had in the file, so writing a table back reproduces the input values
exactly (``starfile.write`` would reformat floats with '%.6f'); only columns we add or replace are
formatted by us.  Column labels are stored without their leading underscore, as ``starfile`` does.

Quoting follows STAR/CIF: a value may be wrapped in '...' or "...", and a quote character ends it only where
whitespace or the end of the line follows, so "my "best" mic.mrc" is one value. The writer quotes what would
otherwise read as something else (empty text, whitespace, a leading quote, '#' or '_', a reserved word) with
whichever quote character the value lets close, so that every value it writes reads back unchanged; the only
values it cannot write are those with a line break or control character (which STAR text cannot hold) or
with both quote characters followed by whitespace.

Loop bodies, which hold the millions of particle rows, are tokenised by pandas' C parser; the few header
lines are parsed in Python so that garbage gets a one-line error naming the file and the line.
"""

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tvae_em.errors import InputError, TvaeError
from tvae_em.io.atomic import atomic_path
from tvae_em.io.files import regular_file

RELION31_VERSION = 30001
# A line that ends a loop body: a block header, a new loop, or a label.
_STRUCTURE_RE = re.compile(rb"^[ \t]*(?:(?:data_\S*|loop_)[ \t]*\r?$|_\S)", re.M)
_COMMENT_LINE_RE = re.compile(rb"^[ \t]*#[^\n]*", re.M)  # blanked, so line numbers stay right
_VERSION_RE = re.compile(r"#\s*version\s+(\d+)")
# Cells that must be quoted (see the module docstring), and cells that cannot be written.
_NEEDS_QUOTES_RE = re.compile(r"""\s|^$|^["'_#]|^(?:data|loop|save|global|stop)_""")
_UNWRITABLE_RE = re.compile(r"[\x00-\x08\x0a-\x1f]")  # line breaks and control characters; tab is fine
# A special first character (or an empty cell) in cells joined by line breaks.
_SPECIAL_START_RE = re.compile(r"""\n(?:[\n"'_#]|(?:data|loop|save|global|stop)_)""")
_RAGGED_RE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
# Control characters other than tab, newline and carriage return never occur in STAR text.
_CONTROL_BYTES = bytes(code for code in range(32) if chr(code) not in "\t\n\r")
# A STAR token: '...' or "..." (quotes removed; inside, a quote character not followed by whitespace is part of
# the value) or a bare word; a quote left open, or closed inside a word, matches the last alternative and is
# refused.
_TOKEN_RE = re.compile(r"""(?<!\S)(?:"((?:[^"]|"(?=\S))*)"|'((?:[^']|'(?=\S))*)'|([^\s"']\S*))(?!\S)|(\S+)""")


@dataclass
class StarBlock:
    """One ``data_<name>`` block: a loop (a table) or label/value pairs (a one-row table)."""

    name: str
    data: pd.DataFrame
    loop: bool = True


@dataclass
class StarFile:
    """Blocks in file order.  ``version`` is the number of the last '# version N' line, if any."""

    blocks: dict[str, StarBlock] = field(default_factory=dict)
    path: Path | None = None
    version: int | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.blocks

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.blocks[name].data

    def replace(self, name: str, data: pd.DataFrame) -> "StarFile":
        """A copy with block ``name`` holding ``data`` (appended if new); other blocks are shared."""
        blocks = dict(self.blocks)
        old = blocks.get(name)
        blocks[name] = StarBlock(name, data, old.loop if old else True)
        return StarFile(blocks, self.path, self.version)


def read_star(path) -> StarFile:
    """Parse a STAR file, keeping every cell as text.  Raises InputError on anything malformed."""
    path = regular_file(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from None
    if not raw.strip():
        raise InputError(path, "empty STAR file")
    if _has_control_bytes(raw):
        raise InputError(path, "binary data, not a STAR text file")
    parser = _Parser(raw, path)
    try:
        blocks = parser.parse()
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    if not blocks:
        raise InputError(path, "no data_ block found (not a STAR file?)")
    return StarFile(blocks, path, parser.version)


def starts_like_star(head: bytes) -> bool:
    """Whether ``head``, the first bytes of a file, begin as STAR text: the first line that is neither blank nor a
    '#' comment opens a data_ block."""
    first = first_statement(head.split(b"\n"))
    return first is not None and first.startswith(b"data_")


def first_statement(lines) -> bytes | None:
    """The first of ``lines`` (bytes) that is neither blank nor a '#' comment, stripped; None when there is none."""
    for line in lines:
        text = line.strip()
        if text and not text.startswith(b"#"):
            return text
    return None


def _has_control_bytes(raw: bytes, chunk: int = 1 << 24) -> bool:
    """True if ``raw`` holds a control character other than tab, newline or carriage return; checked in
    chunks, so a STAR file of a million rows is not copied whole."""
    for start in range(0, len(raw), chunk):
        piece = raw[start:start + chunk]
        if len(piece.translate(None, _CONTROL_BYTES)) != len(piece):
            return True
    return False


class _Parser:
    """Cursor over the raw bytes; header lines one by one, loop bodies handed to pandas whole."""

    def __init__(self, raw: bytes, path: Path):
        self.raw, self.path, self.pos = raw, path, 0
        self.version: int | None = None  # from the last '# version N' comment between blocks

    def line_number(self, pos: int) -> int:
        return self.raw.count(b"\n", 0, pos) + 1

    def fail(self, pos: int, problem: str):
        raise InputError(self.path, f"line {self.line_number(pos)}: {problem}")

    def next_line(self) -> tuple[int, str] | None:
        if self.pos >= len(self.raw):
            return None
        start, end = self.pos, self.raw.find(b"\n", self.pos)
        end = len(self.raw) if end < 0 else end
        self.pos = end + 1
        return start, self.raw[start:end].decode("utf-8").strip()

    def parse(self) -> dict[str, StarBlock]:
        blocks: dict[str, StarBlock] = {}
        name, pairs = None, {}
        while (line := self.next_line()) is not None:
            start, text = line
            if not text or text.startswith("#"):
                if version := _VERSION_RE.match(text):
                    self.version = int(version[1])
                continue
            if text.startswith("data_"):
                self._close_pairs(blocks, name, pairs)
                name, pairs = text[5:], {}
                if name in blocks:
                    self.fail(start, f"data_{name} appears twice")
            elif name is None:
                self.fail(start, f"{text[:40]!r} before the first data_ block")
            elif text.startswith("loop_"):
                if pairs or name in blocks:
                    self.fail(start, f"data_{name} holds more than one table")
                blocks[name] = StarBlock(name, self._parse_loop(name), loop=True)
            elif text.startswith("_"):
                if name in blocks:
                    self.fail(start, f"label {text.split()[0]!r} after the loop of data_{name}")
                self._parse_pair(start, text, pairs)
            else:
                self.fail(start, f"unexpected text {text[:40]!r}")
        self._close_pairs(blocks, name, pairs)
        return blocks

    @staticmethod
    def _close_pairs(blocks, name, pairs):
        if name is not None and name not in blocks:
            blocks[name] = StarBlock(name, pd.DataFrame({k: [v] for k, v in pairs.items()}, dtype=str), False)

    def _parse_pair(self, start: int, text: str, pairs: dict):
        tokens = _tokens(text)
        if tokens is None or len(tokens) != 2:
            self.fail(start, f"expected '_label value', found {text[:60]!r}")
        pairs[tokens[0][1:]] = tokens[1]

    def _parse_loop(self, name: str) -> pd.DataFrame:
        labels = []
        while True:
            label_start = self.pos
            line = self.next_line()
            if line is None or not line[1].startswith("_"):
                self.pos = label_start
                break
            label = line[1].split()[0][1:]
            if label in labels:
                self.fail(line[0], f"label _{label} declared twice in data_{name}")
            labels.append(label)
        if not labels:
            self.fail(self.pos, f"loop_ of data_{name} declares no labels")
        body_start = self.pos
        match = _STRUCTURE_RE.search(self.raw, body_start)
        self.pos = match.start() if match else len(self.raw)
        return self._parse_body(self.raw[body_start:self.pos], labels, name, self.line_number(body_start))

    def _parse_body(self, body: bytes, labels: list[str], name: str, first_line: int) -> pd.DataFrame:
        body = _COMMENT_LINE_RE.sub(b"", body) if b"#" in body else body
        if not body.strip():
            return pd.DataFrame({label: pd.Series([], dtype=str) for label in labels})
        if b'"' in body or b"'" in body:
            return self._parse_quoted_body(body, labels, name, first_line)
        try:
            table = pd.read_csv(io.BytesIO(body), sep=r"\s+", header=None, dtype=str, keep_default_na=False,
                                na_filter=False, engine="c", quoting=3)
        except pd.errors.ParserError as err:
            found = _RAGGED_RE.search(str(err))
            if not found:
                raise InputError(self.path, f"data_{name}: unreadable loop ({err})") from None
            raise InputError(self.path, f"line {first_line + int(found[2]) - 1}: {found[3]} values in a "
                             f"data_{name} row, earlier rows have {found[1]}") from None
        if table.shape[1] != len(labels):
            self._ragged(name, labels, 1, table.shape[1])
        short = np.flatnonzero(table.iloc[:, -1].to_numpy() == "")
        if short.size:
            self._ragged(name, labels, int(short[0]) + 1, "fewer")
        table.columns = labels
        return table

    def _parse_quoted_body(self, body: bytes, labels: list[str], name: str, first_line: int) -> pd.DataFrame:
        """The slow path for loops with quoted values, line by line (rare: RELION writes no quotes)."""
        rows = []
        for line_number, line in enumerate(body.decode("utf-8").split("\n"), start=first_line):
            row = _tokens(line)
            if row is None:
                raise InputError(self.path, f"line {line_number}: unterminated or misplaced quote in "
                                 f"{line.strip()[:60]!r}")
            if row:
                rows.append(row)
                if len(row) != len(labels):
                    self._ragged(name, labels, len(rows), len(row))
        return pd.DataFrame(rows, columns=labels, dtype=str)

    def _ragged(self, name, labels, row: int, count):
        raise InputError(self.path, f"data_{name} row {row}: {count} values for {len(labels)} labels")


def _tokens(line: str) -> list[str] | None:
    """The STAR tokens of one line, or None if a quote is left open (or closed in the middle of a word)."""
    tokens = []
    for match in _TOKEN_RE.finditer(line):
        if match.lastindex == 4:
            return None
        tokens.append(match[match.lastindex])
    return tokens


def format_values(values) -> np.ndarray:
    """Text of new cells: integers as integers, floats as their shortest exact repr, anything else as str.

    float32 arrays print as float32 (e.g. '0.1', not '0.10000000149011612'), so latents stay compact.
    """
    values = np.asarray(values)
    if values.dtype.kind == "b":
        values = values.astype(np.int8)
    return values.astype(str).astype(object)


def with_columns(star: StarFile, block: str, new_columns: pd.DataFrame) -> StarFile:
    """Copy of ``star`` where ``block`` gains the columns of ``new_columns`` (row-aligned by position).

    A label already present is replaced in place; new labels are appended.  A leading '_' in a label is
    accepted and dropped.
    """
    table = star[block].copy()
    if len(new_columns) != len(table):
        raise ValueError(f"{len(new_columns)} rows of new columns for {len(table)} rows in data_{block}")
    for label in new_columns.columns:
        table[str(label).lstrip("_")] = format_values(new_columns[label].to_numpy())
    return star.replace(block, table)


def new_relion31_star(optics: pd.DataFrame, particles: pd.DataFrame) -> StarFile:
    """A fresh RELION 3.1 STAR (``data_optics`` + ``data_particles``) from typed DataFrames."""
    def as_text(frame):
        return pd.DataFrame({str(c).lstrip("_"): format_values(frame[c].to_numpy()) for c in frame.columns})
    return StarFile({"optics": StarBlock("optics", as_text(optics)),
                     "particles": StarBlock("particles", as_text(particles))}, None, RELION31_VERSION)


def image_name_texts(numbers, stacks) -> np.ndarray:
    """rlnImageName cells as RELION writes them, '000012@Extract/x.mrcs': image ``numbers`` (1-based, an integer
    array) in ``stacks`` (one name per image, or one for all)."""
    return (pd.Series(numbers).astype(str).str.zfill(6) + "@" + stacks).to_numpy(dtype=object)


def particles_block(star: StarFile) -> str:
    """Name of the particles table: ``data_particles`` if it lists images, else the first loop that does."""
    if "particles" in star and "rlnImageName" in star["particles"].columns:
        return "particles"
    for name, block in star.blocks.items():
        if block.loop and "rlnImageName" in block.data.columns:
            return name
    raise InputError(star.path, "no data block has an _rlnImageName column")


def write_star(path, star: StarFile, new_columns: pd.DataFrame | None = None, block: str | None = None):
    """Write ``star`` atomically, RELION 3.1 style, optionally with ``new_columns`` added to ``block``
    (default: the particles table)."""
    if new_columns is not None:
        star = with_columns(star, block or particles_block(star), new_columns)
    version = max(star.version or 0, RELION31_VERSION)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for item in star.blocks.values():
            out.write(f"\n# version {version}\n\ndata_{item.name}\n\n")
            try:
                _write_block(out, item)
            except _Unwritable as err:
                raise TvaeError(f"{path}: cannot write {err.value!r} in data_{item.name}: {err.reason}") from None


def _write_block(out, block: StarBlock, rows_per_write: int = 100_000):
    table = block.data
    if not block.loop:
        for label in table.columns:
            out.write(f"_{label} {_quoted(table[label])[0]}\n")
        return
    out.write("loop_\n")
    out.write("".join(f"_{label} #{i}\n" for i, label in enumerate(table.columns, start=1)))
    for start in range(0, len(table), rows_per_write):
        columns = [_quoted(table[label].iloc[start:start + rows_per_write]) for label in table.columns]
        lines = columns[0]
        for column in columns[1:]:
            lines = lines + " " + column
        out.write("\n".join(lines) + "\n")
    out.write("\n")


def _quoted(column: pd.Series) -> np.ndarray:
    """Cells as STAR tokens (object array), quoted where needed (module docstring); raises _Unwritable.

    Whole-column scans rule out the common case (no cell needs care) without a per-cell regex: no whitespace or
    control character (all of them are unprintable, except the space) and no special first character.
    """
    text = column.astype(str).to_numpy(dtype=object)
    joined = "".join(text)
    if joined.isprintable() and " " not in joined and not _SPECIAL_START_RE.search("\n" + "\n".join(text) + "\n"):
        return text
    return np.array([_token(cell) for cell in text], dtype=object)


class _Unwritable(Exception):
    def __init__(self, value: str, reason: str):
        super().__init__(reason)
        self.value, self.reason = value, reason


def _token(cell: str) -> str:
    """One cell as a STAR token that ``_tokens`` reads back as ``cell``."""
    if _UNWRITABLE_RE.search(cell):
        raise _Unwritable(cell, "STAR text cannot hold line breaks or control characters")
    if not _NEEDS_QUOTES_RE.search(cell):
        return cell
    for quote in "\"'":
        if not re.search(quote + r"\s", cell):
            return quote + cell + quote
    raise _Unwritable(cell, "both quote characters are followed by whitespace in it, so no quoting can hold it")


def numeric_column(star: StarFile, block: str, label: str) -> np.ndarray:
    """Column ``label`` of ``block`` as float64; InputError naming the row of the first non-number."""
    if label not in star[block].columns:
        raise InputError(star.path, f"data_{block} has no _{label} column")
    text = star[block][label]
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(values) & (text.str.lower() != "nan").to_numpy())
    if bad.size:
        row = int(bad[0])
        raise InputError(star.path,
                         f"data_{block} row {row + 1}: _{label} {text.iloc[row]!r} is not a number")
    return values
