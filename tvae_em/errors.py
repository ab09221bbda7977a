"""The project's own error types and the exit codes the CLI maps them to.

A user mistake (bad option, bad file) is raised as one of these with a one-line message that names the
file and the problem; the CLI prints ``error: <message>`` on stderr and exits with ``exit_code``.
Anything else is a bug and keeps its traceback.
"""

EXIT_USAGE = 2  # bad command line: unknown option, refused output path, incompatible options
EXIT_DATA = 3  # bad input data: unreadable STAR/MRC, missing columns, images out of range, NaN pixels
EXIT_OUTPUT = 4  # an output cannot be written: disk full, quota or file-size limit, no permission
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM after saving what was finished


class TvaeError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""

    exit_code = EXIT_DATA


class FileError(TvaeError):
    """A problem with one file. Message: '<path>: <problem>'."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputError(FileError):
    """An input file is missing, unreadable or inconsistent."""

    exit_code = EXIT_DATA


class OutputError(FileError):
    """An output file cannot be written: disk full, quota or file-size limit, read-only folder."""

    exit_code = EXIT_OUTPUT


class UsageError(TvaeError):
    """The command line asks for something that cannot be done (e.g. output path equals an input)."""

    exit_code = EXIT_USAGE


class Interrupted(TvaeError):
    """SIGINT/SIGTERM stopped a command (``tvae_em.runtime``); what was finished is kept, nothing partial."""

    exit_code = EXIT_INTERRUPTED
