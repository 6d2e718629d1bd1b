"""Errors the CLI turns into exit codes: bad input is 2, a failed check is 1."""


class UsageError(Exception):
    """Bad input or usage. The message is one line naming the problem and the fix."""


class VerificationError(Exception):
    """The produced model failed a check (forward pass, shapes, reload parity)."""
