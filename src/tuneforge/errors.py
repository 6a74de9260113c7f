"""The one exception type for a user's mistake; the CLI prints it as one line and exits 2."""


class TuneforgeError(Exception):
    """A problem the user can fix (bad data, bad config, missing file).

    The message is a single line that names where (file:line or config key) and what to do.
    ``key``: the config key it is about, when there is one (the web UI shows the line there).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
