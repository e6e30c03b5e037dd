"""User-facing errors: the CLI prints the message on one line and exits non-zero."""


class FeatcacheError(Exception):
    """Bad input or an impossible request; the message is shown to the user as-is."""
