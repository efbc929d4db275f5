"""The one exception type that reaches the user as a one-line message."""


class SanityError(Exception):
    """A problem with the user's input or environment, with the fix in its message.

    The CLI prints it as a single line and exits with code 2; anything else is a bug
    and keeps its traceback.
    """
