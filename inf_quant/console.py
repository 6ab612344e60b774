"""What reaches the user's terminal: our log lines, the libraries' (only with --verbose), one-line error text, and
the crash log that holds everything else (traceback + recent log lines) when the CLI exits 3."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from . import __version__
from .core.hashing import default_cache_root

NOISY = ("torch", "torch.utils._pytree", "torchao", "transformers", "gptqmodel", "logbar", "optimum", "accelerate",
         "huggingface_hub", "urllib3", "tokenizers", "device_smi", "datasets", "defuser")
_recent: collections.deque = collections.deque(maxlen=2000)  # library (and our) log lines, for the crash log


class _Recent(logging.Handler):
    def emit(self, record):
        with contextlib.suppress(Exception):
            _recent.append(self.format(record))


@contextlib.contextmanager
def terminal(verbose: bool, level: str = "INFO"):
    """Our log lines (logger inf_quant) from `level` up (--log-level, else $INF_QUANT_LOG) on stderr; the
    libraries' only with --verbose. Everything, shown or not, is also kept for the crash log. Restored on exit
    (main() may run in-process, e.g. under pytest)."""
    fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    term, recent = logging.StreamHandler(sys.stderr), _Recent()
    for h in (term, recent):
        h.setFormatter(fmt)
    ours, root = logging.getLogger("inf_quant"), logging.getLogger()
    saved = [(lg, lg.level, lg.propagate) for lg in (ours, root, *map(logging.getLogger, NOISY))]
    ours.setLevel(level)
    ours.propagate = False
    ours.addHandler(term)
    ours.addHandler(recent)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    root.addHandler(recent)
    if verbose:
        root.addHandler(term)
    logging.captureWarnings(True)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
        for name in NOISY:  # some add their own stderr handlers (torch, transformers): no propagation to root
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")  # library Future/Deprecation/User warnings
            yield
    finally:
        logging.captureWarnings(False)
        for h in (term, recent):
            ours.removeHandler(h)
            root.removeHandler(h)
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate


@contextlib.contextmanager
def library_stdout(args):
    """The loading stack prints banners on stdout, which is for our output: to stderr with --verbose, else into
    the crash log only."""
    if getattr(args, "verbose", False):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return

    class _Sink:
        def write(self, s):
            if s.strip():
                _recent.append(s.rstrip())
            return len(s)

        def flush(self):
            pass

    with contextlib.redirect_stdout(_Sink()):
        yield


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises errors.Terminated (a KeyboardInterrupt) in the main thread for the with-block, so the run's
    cleanup is Ctrl-C's; a second SIGTERM during that cleanup kills as usual. Restored on exit (main() may run
    in-process). Outside the main thread (where handlers cannot be set) nothing changes."""
    import signal
    import threading

    from .core.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def crash_log_dir(log_dir: str | None = None) -> Path:
    """--log-dir, else $INF_QUANT_LOG_DIR, else the cache root's logs/ ($XDG_CACHE_HOME/inf-quant/logs,
    ~/.cache/inf-quant/logs)."""
    d = log_dir or os.environ.get("INF_QUANT_LOG_DIR")
    return Path(d) if d else default_cache_root() / "logs"


def crash_log(argv, e: BaseException, log_dir: str | None = None) -> str:
    """Write the crash log (version, argv, recent log lines, traceback); where it went, for the one line. If the
    log directory cannot be written, the system's temporary directory takes it and the line says why."""
    import tempfile

    want = crash_log_dir(log_dir)
    text = (f"inf-quant {__version__}\nargv: {json.dumps(argv)}\n\n" + "\n".join(_recent) + "\n\n"
            + "".join(traceback.format_exception(e)))
    name = f"inf-quant-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    why = ""
    for d in (want, Path(tempfile.gettempdir()) / "inf-quant-logs"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
        except OSError as err:
            why = why or f"{want} is not writable ({err.strerror or err}): pass --log-dir or set INF_QUANT_LOG_DIR"
            continue
        return f"{d / name}" + (f"; {why}" if why else "")
    return f"nowhere: {why}, and the temporary directory failed too"


def one_line(e: BaseException) -> str:
    """The exception's message and the notes added on the way up (cleanup done), on one line."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return "; ".join([msg, *getattr(e, "__notes__", ())])


def environment_advice(e: OSError) -> str | None:
    """One-line advice for the OS errors users can fix; None for the rest."""
    import errno

    where = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a copy's error names its source first, the file written second
        return f"disk full writing {e.filename2 or where}: free space or choose --out on another disk"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where} ({e.strerror}): choose an output location you can write"
    if e.errno == errno.ENOENT and e.filename:
        return f"{where}: no such file or directory (was it removed during the run?)"
    return None
