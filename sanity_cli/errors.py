"""The one exception type that reaches the user as a one-line message, and the one way
another library's exception is put into such a line."""


class SanityError(Exception):
    """A problem with the user's input or environment, with the fix in its message.

    The CLI prints it as a single line and exits with code 2; anything else is a bug
    and keeps its traceback.
    """


def one_line(error: BaseException) -> str:
    """Another library's exception as part of one line of a SanityError.

    Hydra's and OmegaConf's messages are written for the user: their first two sentences,
    without the indented details below them (full_key: ..., object_type=...). Any other
    exception (the user's model code, an import, Captum) is named by its type, which says
    what went wrong there, with its message on one line, cut at 240 characters.
    """
    if type(error).__module__.partition(".")[0] in ("hydra", "omegaconf"):
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(" ")]
        return " ".join(lines[:2]) or type(error).__name__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}" if text else type(error).__name__
