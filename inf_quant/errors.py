"""Exception hierarchy. The CLI turns every InfQuantError into one line on stderr and exit code 2
(VerifyFailed: exit code 1)."""


class InfQuantError(Exception):
    """Base class: bad input or environment that the user can fix."""


class ConfigError(InfQuantError):
    """A recipe, flag or config value is invalid."""


class CheckpointError(InfQuantError):
    """A checkpoint directory is missing, malformed, or unsupported."""


class NumericalError(InfQuantError):
    """A numerical step failed (Cholesky after bounded damping, non-finite values, fp16 overflow)."""


class VerifyFailed(InfQuantError):
    """A verification gate failed."""
