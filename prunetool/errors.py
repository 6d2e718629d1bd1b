"""Errors the CLI turns into exit codes: a failed check is 1, bad input is 2, a bug is 3."""


class UsageError(Exception):
    """Bad input or usage (exit 2). The message is one line naming the problem and the fix."""

    exit_code = 2


class TargetUnreachable(UsageError):
    """A size or latency target no cut of the kind asked for meets (exit 2): a plan across axes tries another."""


class VerificationError(Exception):
    """The produced model failed a check: forward pass, shapes, removal, reload or export parity (exit 1)."""

    exit_code = 1


class InternalError(Exception):
    """Anything unexpected: a bug in prunetool or in the model's own code (exit 3)."""

    exit_code = 3
