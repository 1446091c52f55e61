"""The one error type a user sees: bad input, named cause, exit code 2 on the CLI."""


class SplitcError(Exception):
    """A problem with what the user gave splitc (file, model, device, strategy, shape).

    The CLI prints the message without a traceback and exits with code 2.
    """


#: Cap on how much of a wrapped error message (TVM's, ONNX's, torch's) is repeated to the user.
MAX_MESSAGE_CHARS = 1500


def short_message(e: BaseException | str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message cut to ``limit`` characters (head and tail kept)."""
    text = str(e).strip()
    if len(text) <= limit:
        return text
    return text[: limit // 3] + " ... " + text[-(2 * limit) // 3:]
