"""The one exception type for user mistakes (bad input, missing files, bad option values)."""


class LeanLMError(Exception):
    """A problem the user can fix, explained in one sentence.

    The CLI prints the message on stderr and exits with code 2 (no stack trace).
    """


class Interrupted(Exception):
    """Work stopped by Ctrl-C or SIGTERM after saving what it had (e.g. a distill checkpoint).

    The message says what was saved and how to continue; the CLI prints it and exits 130.
    """
