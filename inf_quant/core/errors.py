"""Exception hierarchy. The CLI turns every InfQuantError into one line on stderr and exit code 2 (a failed
verification gate is not an error: verify reports it and exits 1)."""


class InfQuantError(Exception):
    """Base class: bad input or environment that the user can fix."""


class ConfigError(InfQuantError):
    """A recipe, flag or config value is invalid."""


class CheckpointError(InfQuantError):
    """A checkpoint directory is missing, malformed, or unsupported."""


class NumericalError(InfQuantError):
    """A numerical step failed (Cholesky after bounded damping, non-finite values, fp16 overflow)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`), raised by the CLI's handler in the main thread: handled like Ctrl-C,
    so the lock is released and a resumable work directory kept."""


def is_oom(e: BaseException) -> bool:
    """Host (MemoryError, or torch's CPU allocator failing: a RuntimeError "DefaultCPUAllocator: can't allocate
    memory") or CUDA (torch.OutOfMemoryError) out of memory; checked by name, torch need not be loaded."""
    return (isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))


def resumable(e: BaseException) -> bool:
    """A failure after which a run's work directory is kept for --resume (an interrupt, running out of memory);
    after any other failure (bad input, disk full, a bug) it is removed."""
    return isinstance(e, KeyboardInterrupt) or is_oom(e)
