"""The one exception type for a user's mistake; the CLI prints it and exits 2."""


class UserError(ValueError):
    """Bad input from the user (unknown model, bad option, unreadable file...).

    A subclass of ValueError so library callers can catch either; anything else that escapes
    is a bug of ours and keeps its traceback.
    """
