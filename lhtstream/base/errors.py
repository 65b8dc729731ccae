"""The one exception family the CLI turns into a one-line message."""


class LhtstreamError(Exception):
    """A problem with the user's input or files; the message names what and where."""
