"""Property tests: any STAR-like text either parses or raises the project's one-line InputError, and any string
value survives the writer and the reader.

The generated files mix the pieces real STAR files are made of (blocks, loops, labels, values, quotes,
comments, version lines) with the ways they go wrong (ragged rows, open quotes, stray text, garbage bytes,
other line endings), so most examples get deep into the parser instead of failing on the first line.
"""

import re

import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tvae_em.errors import InputError, TvaeError
from tvae_em.io.star import StarBlock, StarFile, read_star, write_star

LABELS = ["rlnImageName", "rlnOpticsGroup", "rlnAnglePsi", "rlnMicrographName", "rlnA", "tvaeZ01"]
VALUES = ["1", "-2.5e-3", "nan", "inf", "000001@a.mrcs", "opticsGroup1", "[0.1,0.2]", '"a b"', "'c d'", '""',
          "''", 'x"y', "it's", "a\\", "\\", "#notcomment", "data_in_value", "_label_like", "loop_x", "é"]
TRICKY_VALUES = ['"open', "'open", '"a"b', "'a'b", "\u00a0", "\u2028", "\u3000", "\x85"]
NOISE_LINES = ["data_", "loop_", "_rlnA", "_", "# version 30001", "# version x", "#", "", "   ",
               "stray words"]
SEPARATORS = [" ", "  ", "\t", " \t "]

word = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=6)
values = st.one_of(*[st.sampled_from(VALUES)] * 10, st.sampled_from(TRICKY_VALUES), word)


@st.composite
def row(draw, width: int) -> str:
    if draw(st.integers(0, 19)) == 0:  # ragged
        width = draw(st.integers(0, width + 2))
    return draw(st.sampled_from(SEPARATORS)).join(draw(values) for _ in range(width))


@st.composite
def block(draw) -> list[str]:
    lines = ["data_" + draw(st.sampled_from(["", "particles", "optics", "x", "x y"]))]
    labels = draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=4, unique=True))
    if draw(st.booleans()):
        lines.append("loop_")
        lines += [f"_{label}" + draw(st.sampled_from(["", f" #{i}"])) for i, label in enumerate(labels, 1)]
        lines += [draw(row(len(labels))) for _ in range(draw(st.integers(0, 6)))]
    else:
        lines += [f"_{label} {draw(row(1))}" for label in labels]
    return lines


@st.composite
def star_like_bytes(draw) -> bytes:
    """A few STAR blocks, then up to 2 mutations (a noise line inserted, a line dropped, junk bytes) and
    sometimes truncation."""
    lines = [draw(st.sampled_from(["", "# version 30001"]))]
    for _ in range(draw(st.integers(1, 3))):
        lines += draw(block())
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(lines)))
        mutation = draw(st.sampled_from(["insert", "insert", "drop", "drop", "junk"]))
        if mutation == "insert":
            lines.insert(at, draw(st.sampled_from(NOISE_LINES) | st.text(max_size=12)))
        elif mutation == "drop" and at < len(lines):
            del lines[at]
        elif mutation == "junk":
            lines.insert(at, draw(st.binary(min_size=1, max_size=8)).decode("latin-1"))
    raw = draw(st.sampled_from(["\n", "\r\n"])).join(lines).encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 39)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


def tables(star: StarFile) -> dict:
    return {name: block.data.reset_index(drop=True) for name, block in star.blocks.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=star_like_bytes())
def test_star_like_text_parses_or_raises_input_error(tmp_path, raw):
    path = tmp_path / "fuzz.star"
    path.write_bytes(raw)
    try:
        star = read_star(path)
    except InputError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1, message
        return
    for block in star.blocks.values():
        assert all(block.data[label].map(type).eq(str).all() for label in block.data.columns)
    write_star(tmp_path / "back.star", star)  # what parses is kept exactly: it reads back the same
    back = read_star(tmp_path / "back.star")
    assert list(back.blocks) == list(star.blocks)
    for name, table in tables(star).items():
        pd.testing.assert_frame_equal(tables(back)[name], table)


# Characters STAR syntax gives a meaning to, mixed into arbitrary text so that most values are hard ones.
SYNTAX = st.sampled_from(['"', "'", " ", "\t", "#", "_", "data_", "loop_", "save_", "\u00a0", "\u2028", "\x85"])
any_text = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=4) | SYNTAX,
                    max_size=5).map("".join)


def unwritable(value: str) -> bool:
    """What STAR text cannot hold (star.py's module docstring): a line break or another control character
    than tab, or both quote characters followed by whitespace (no quoting can then hold the value)."""
    control = re.search(r"[\x00-\x08\x0a-\x1f]", value)
    return bool(control) or bool(re.search(r'"\s', value) and re.search(r"'\s", value))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(any_text, min_size=1, max_size=4), loop=st.booleans())
@example(values=['my "best" mic.mrc', "it's", "", "#1", "_x", "data_", "'a", '"a"b'], loop=True)
@example(values=["Bob's \"good\" mic.mrc"], loop=False)
def test_any_string_value_survives_the_writer_and_the_reader(tmp_path, values, loop):
    table = pd.DataFrame({"rlnA": values, "rlnB": values[::-1]} if loop else {label: [value] for label, value
                         in zip(["rlnA", "rlnB", "rlnC", "rlnD"], values, strict=False)}, dtype=str)
    star = StarFile({"x": StarBlock("x", table, loop), "y": StarBlock("y", table, loop)})
    path = tmp_path / "values.star"
    try:
        write_star(path, star)
    except TvaeError as error:
        assert any(unwritable(value) for value in values), error
        assert str(error).startswith(f"{path}: cannot write ") and len(str(error).splitlines()) == 1
        return
    assert not any(unwritable(value) for value in values)
    back = read_star(path)
    for name in ("x", "y"):
        pd.testing.assert_frame_equal(back[name].reset_index(drop=True), table)
