"""The one exception type for mistakes a user can fix (bad config, mesh, data or checkpoint)."""


class UserError(ValueError):
    """A one-line message saying what is wrong and how to fix it.

    The CLI prints it without a traceback and exits with status 2.
    """
