"""What tvae-em writes on a stderr that is not a terminal (a pipe, a file, pytest's capture), told apart."""

import re

# a plain progress line, one per tenth of the work: 'encoding: 30 % (3/10 particles, 0 s)'
PROGRESS_LINE = re.compile(r"^[\w /]+: \d+ % \(\d+/\d+ \w+, \d+ s\)$")


def message_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` (any Unicode line break splits) without the progress lines."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
