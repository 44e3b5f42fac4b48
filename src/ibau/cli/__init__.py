"""The ``ibau`` command: one small module per command, each only parsing its options,
calling one job of :mod:`ibau.jobs` and printing.

Commands register in :data:`COMMANDS` (``ibau.cli.options.Command``). Every bad input
-- an option the parser or the library refuses, a file that cannot be read, an output
that would replace an input -- ends with exactly one line ``ibau: error: ...`` on
standard error and exit status 2, before any work (a file that cannot be read or written
during the run ends the same way, saying what was written). SIGINT and SIGTERM stop the run and
say what was written (exit 130 / 143).
"""

from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path

from . import bench, defend, demo, evaluate, poison, scan, unlearn  # noqa: F401  (they register themselves)
from .options import COMMANDS, CommandLineError, build_parser

__all__ = ["main", "build_parser", "COMMANDS"]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


def _launch(cmd, args) -> int:
    """Run a command as one rank of a torchrun job: join the process group (gloo on CPU,
    NCCL with one GPU per rank), keep ranks other than 0 quiet, leave the group after."""
    import contextlib
    import os

    from ..distributed import init_from_env, shutdown
    from ..jobs.inputs import resolve_device

    requested = getattr(args, "device", None)
    comm, device = init_from_env(None if requested in (None, "auto") else resolve_device(requested))
    if hasattr(args, "device"):
        args.device = str(device)
    try:
        if comm is not None and comm.rank != 0:
            if hasattr(args, "quiet"):
                args.quiet = True
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                return cmd.run(args)
        return cmd.run(args)
    finally:
        shutdown()


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    """Library warnings as one line each (``ibau: warning: ...``), never a source excerpt."""
    print(f"ibau: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from ..distributed import launched
    from ..errors import InputError
    from ..jobs.outputs import describe_written

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a worker thread): leave signals alone
        pass
    written: list[Path] = []  # the jobs append each file they finish (see ibau.jobs.Outputs)
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        cmd = COMMANDS[args.command]
        args._written = written
        if launched():  # torchrun --nproc-per-node N -m ibau ...
            return _launch(cmd, args)
        return cmd.run(args)
    except (InputError, CommandLineError, FileExistsError, ImportError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ibau: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read, or a disk that filled up during the run
        print(f"ibau: error: {' '.join(str(exc).split())}; {describe_written(written)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"ibau: {what}; {describe_written(written)}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
