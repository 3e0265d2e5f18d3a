"""The one exception type the faces of the project (CLI, app) show to people as-is."""


class SafeSteerError(Exception):
    """A problem the user can act on.

    Its message is a single plain sentence; the CLI prints it as one line and the app shows it
    as a message, so no traceback ever reaches a policy author.
    """
