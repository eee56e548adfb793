"""The one exception type for user mistakes (bad input, missing files, bad option values)."""


class LeanLMError(Exception):
    """A problem the user can fix, explained in one sentence.

    The CLI prints the message on stderr and exits with code 2 (no stack trace).
    """
