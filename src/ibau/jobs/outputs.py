"""Output planning: every file a job will write is checked before the work starts.

:class:`Outputs` collects the job's output paths and its input paths, and
:meth:`Outputs.check` refuses, before anything runs:

* an output that equals, contains or lies inside an input (weights, data file or
  folder, manifest, model definition) -- even with ``force``: inputs are never destroyed;
* an existing output without ``force``, and two outputs at the same place;
* an output whose folder cannot be created or written.

The job then writes through :meth:`Outputs.write_*` in the order it chooses (weights
before the report that names them) and :attr:`Outputs.written` says what is on disk,
for the interruption message. Files and folders get the user's umask (see
:mod:`ibau.io`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

__all__ = ["Outputs", "OutputPath", "describe_written"]


def _real(p: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside ``b`` (both resolved)."""
    return a == b or b in a.parents


@dataclass
class OutputPath:
    path: Path
    what: str
    folder: bool = False  # a folder the job creates (replaced as a whole with force)
    may_exist: bool = False  # a file the job resumes from (a training checkpoint): its reader checks it


@dataclass
class Outputs:
    """The outputs of one job, checked against its inputs."""

    force: bool = False
    outputs: list[OutputPath] = field(default_factory=list)
    inputs: list[tuple[Path, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def add(self, path: str | os.PathLike | None, what: str, *, folder: bool = False,
            suffix: str | None = None, may_exist: bool = False) -> Path | None:
        if path is None:
            return None
        p = Path(path)
        if not str(p).strip():
            raise InputError(f"the {what} path is empty")
        if suffix is not None and p.suffix != suffix:
            raise InputError(f"the {what} must end in {suffix}, got {p}")
        self.outputs.append(OutputPath(p, what, folder, may_exist))
        return p

    def add_input(self, path: str | os.PathLike | None, what: str) -> None:
        if path is not None:
            self.inputs.append((Path(path), what))

    def add_inputs(self, paths: Iterable[str | os.PathLike], what: str) -> None:
        for p in paths:
            self.add_input(p, what)

    def check(self) -> None:
        """Refuse every problem with the outputs before any work (see the module docstring)."""
        seen: dict[Path, str] = {}
        for out in self.outputs:
            real = _real(out.path)
            for inp, what in self.inputs:
                ireal = _real(inp)
                if _inside(ireal, real) or _inside(real, ireal):
                    rel = "is" if ireal == real else ("contains" if _inside(ireal, real) else "lies inside")
                    raise InputError(f"the {out.what} {out.path} {rel} the input {what} {inp}; inputs are never "
                                     "overwritten: choose another output path")
            for other, what in seen.items():
                if _inside(real, other) or _inside(other, real):
                    raise InputError(f"the {out.what} {out.path} and the {what} are at the same place: "
                                     "give them different paths")
            seen[real] = f"{out.what} {out.path}"
            if out.may_exist or not (out.path.exists() or out.path.is_symlink()):
                pass
            elif not self.force:
                raise InputError(f"the {out.what} {out.path} exists; pass --force to replace it")
            elif out.folder:
                from ..io import check_replaceable_folder

                check_replaceable_folder(out.path, force=True)
            elif out.path.is_dir():
                raise InputError(f"the {out.what} {out.path} is a folder; give a file path")
            elif not out.path.is_file():
                raise InputError(f"the {out.what} {out.path} exists and is not a regular file (a device, "
                                 "a pipe or a broken link); give a file path")
            self._check_writable(out)

    @staticmethod
    def _check_writable(out: OutputPath) -> None:
        parent = _real(out.path).parent
        probe = parent
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise InputError(f"cannot write the {out.what} {out.path}: {probe} is not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise InputError(f"cannot write the {out.what} {out.path}: the folder {probe} is not writable")

    def check_space(self, nbytes: int) -> None:
        """Refuse, before the work, when a folder the outputs go to has less than
        ``nbytes`` (plus 1 MiB) free: a full disk is found now, not after the run."""
        need = int(nbytes) + (1 << 20)
        seen: set[Path] = set()
        for out in self.outputs:
            probe = _real(out.path).parent
            while not probe.exists() and probe.parent != probe:
                probe = probe.parent
            if probe in seen:
                continue
            seen.add(probe)
            try:
                free = shutil.disk_usage(probe).free
            except OSError:
                continue
            if free < need:
                raise InputError(f"the disk holding {probe} has {free} bytes free; the outputs need about {need}: "
                                 "free some space or choose another output folder")

    def wrote(self, path: Path) -> None:
        self.written.append(Path(path))


def describe_written(paths: list[Path]) -> str:
    """What an interrupted or failed job leaves on disk, for its last message."""
    return "written so far: " + ", ".join(map(str, paths)) if paths else "nothing was written"
