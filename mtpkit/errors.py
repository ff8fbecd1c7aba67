"""User-facing errors: anything raised as MtpkitError is printed by the CLI as one line, exit code 2."""


class MtpkitError(Exception):
    """One-line user-facing error (bad input, missing file, mismatched config)."""
