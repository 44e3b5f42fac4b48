"""What I-BAU and the naive heuristic share: one universal perturbation ``delta`` against a
model fine-tuned on the clean set (the minimax of the I-BAU paper, Section 3, Eq. 1).

:class:`UniversalPerturbation` holds their common settings (validated in one place),
their preparation (the model in eval mode in pixel space, the clean batches, the outer
optimiser, the seeded generator) and the pieces of the outer step (which images of an
outer batch receive ``delta``, the divergence check). The arithmetic lives in
:mod:`ibau.perturbation`.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..distributed import Comm, communicator
from ..errors import InputError, check_choice, check_int, check_number
from ..metrics import model_device
from ..optim import OPTIMIZERS, make_optimizer
from ..perturbation import add, check_normalize, choose_perturbed, project_l2
from .base import Defense, Run

__all__ = ["UniversalPerturbation", "Batch", "Setup", "all_finite"]


def all_finite(params: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor of ``params`` is finite."""
    return all(math.isfinite(float(p.detach().abs().sum())) for p in params)


class Batch(NamedTuple):
    """One clean batch as this process holds it.

    In a single process: the whole batch, ``weight`` 1. In data-parallel mode
    (:mod:`ibau.distributed`): this process's ``rows`` of a global batch of ``size``
    images, and ``weight`` = its share of them, so that the processes' weighted losses
    sum to the global batch's mean loss.
    """

    x: Tensor
    y: Tensor
    weight: float = 1.0
    size: int | None = None
    rows: slice | None = None

    @classmethod
    def of(cls, batch: Batch | Sequence[Tensor]) -> Batch:
        """A :class:`Batch` from a ``Batch`` or an ``(x, y)`` pair (the whole batch)."""
        b = batch if isinstance(batch, cls) else cls(*batch)
        return b if b.rows is not None else b._replace(size=len(b.x), rows=slice(0, len(b.x)))


@dataclass
class Setup:
    """What :meth:`UniversalPerturbation._prepare` builds before the clock starts."""

    net: nn.Module  # the model as computed with: pixel input, eval mode (I-BAU: BatchNorm folded)
    params: list[Tensor]  # the model's trainable parameters (the net shares them)
    batches: list[Batch]  # the clean set, in order, on the model's device and dtype
    optimizer: torch.optim.Optimizer  # the outer optimiser
    generator: torch.Generator  # seeded: which images receive delta
    comm: Comm  # the processes (a stand-in for one)
    first: Batch | None = None  # I-BAU: the images of the fixed-point map (set by IBAU._prepare)
    reversed: dict | None = None  # I-BAU: class -> reversed trigger stamped in recovery (reversed_fraction)
    found: dict | None = None  # I-BAU: those triggers as the scan (or the caller) gave them, before amplify_steps
    pseudo: list[Tensor] | None = None  # I-BAU: per batch, the top class of the model as prepared (round 1's inner pass)
    labels: list[Tensor] | None = None  # I-BAU: per batch, the clean labels where ``batches`` hold soft targets
    amplified: dict | None = None  # I-BAU: the numbers of this round's amplification (IBAU.before_round)
    clean_accuracy: float | None = None  # I-BAU (guard_drop): accuracy on the clean set's labels before round 1


class UniversalPerturbation(Defense):
    """Base of :class:`~ibau.defenses.IBAU` and :class:`~ibau.defenses.NaiveUAP`.

    The model stays in eval mode throughout (BatchNorm statistics frozen, dropout off);
    every parameter that requires grad is updated. Settings it validates and keeps:
    ``rounds``, ``norm_bound``, ``outer_lr``, ``outer_optimizer``, ``batch_size``,
    ``perturb_fraction``, ``normalize``, ``seed``, ``clip_images``, ``progress`` (see the
    subclasses). ``fit`` records one point per round (``round``, the method's numbers,
    ``outer_loss``, timings) and returns the last perturbation (1, C, H, W) on the CPU in
    ``extras["delta"]``.
    """

    point_key = "round"
    #: what to lower when the weights diverge (the error message's advice)
    divergence_hint = "lower outer_lr"

    def _set_common(self, *, rounds, norm_bound, outer_lr, outer_optimizer, batch_size, perturb_fraction, normalize,
                    seed, clip_images, progress) -> None:
        self.rounds = check_int("rounds", rounds, low=0)
        self.norm_bound = check_number("norm_bound", norm_bound, low=0, low_open=True, allow_none=True)
        self.outer_lr = check_number("outer_lr", outer_lr, low=0, low_open=True)
        self.outer_optimizer = check_choice("outer_optimizer", outer_optimizer, OPTIMIZERS)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.perturb_fraction = check_number("perturb_fraction", perturb_fraction, low=0, low_open=True, high=1)
        self.normalize = check_normalize(normalize)
        self.seed = check_int("seed", seed)
        self.clip_images = check_choice("clip_images", clip_images, (True, False, None))
        self.progress = progress

    # ------------------------------------------------------------------ pieces
    @property
    def _clip(self) -> bool:
        return self.norm_bound is None if self.clip_images is None else self.clip_images

    def _perturb(self, x: Tensor, delta: Tensor) -> Tensor:
        return add(x, delta, self._clip)

    def project(self, delta: Tensor) -> Tensor:
        """The projection onto the l2 ball of radius ``norm_bound`` (none when ``None``)."""
        return project_l2(delta, self.norm_bound)

    def choose_perturbed(self, n: int, generator: torch.Generator) -> Tensor:
        """Indices of the images of an n-image outer batch that receive delta."""
        return choose_perturbed(n, self.perturb_fraction, generator)

    def perturbed_mask(self, n: int, generator: torch.Generator, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> Tensor:
        """(n, 1, 1, 1): 1 for the images of an outer batch that receive delta, else 0."""
        sel = torch.zeros(n, 1, 1, 1, device=device, dtype=dtype)
        sel[self.choose_perturbed(n, generator).to(device)] = 1.0
        return sel

    def clean_batches(self, x: Tensor, y: Tensor, device: torch.device, dtype: torch.dtype,
                      comm: Comm | None = None) -> list[Batch]:
        """``(x, y)`` cut into consecutive batches of ``batch_size`` on ``device``; this
        process's share of each under ``comm``."""
        comm = comm if comm is not None else communicator(False)
        out = []
        for i in range(0, len(x), self.batch_size):
            n = min(self.batch_size, len(x) - i)
            rows = comm.shard(n)
            sl = slice(i + rows.start, i + rows.stop)
            out.append(Batch(x[sl].to(device, dtype), y[sl].to(device), (rows.stop - rows.start) / n, n, rows))
        return out

    # ------------------------------------------------------------------ template hooks
    def _prepare(self, run: Run) -> Setup:
        """The communicator, the model in pixel space and eval mode, its trainable
        parameters, the outer optimiser, the seeded generator and the clean batches."""
        comm = communicator(getattr(self, "distributed", False))
        device = model_device(run.model)
        net = self.wrap(run.model)
        net.eval()
        # Parameters are taken from the model itself: a folded view shares them.
        params = self.trainable(net)
        weights = [p for p in net.parameters() if p.requires_grad]  # the trainable ones and any left as they are
        net = self.compute_view(net, device)
        if not params:
            raise InputError("the model has no parameters that require grad")
        optimizer = make_optimizer(self.outer_optimizer, params, lr=self.outer_lr, parameter="outer_optimizer")
        generator = torch.Generator().manual_seed(self.seed)
        dtype = params[0].dtype if params[0].is_floating_point() else torch.float32
        if not comm.same_everywhere(len(run.x), device):
            raise InputError("distributed: every process must pass the same clean set "
                             "(it keeps its own shard of each batch)")
        comm.broadcast_(weights)  # every process starts from rank 0's weights
        batches = self.clean_batches(run.x, run.y, device, dtype, comm)
        return Setup(net, params, batches, optimizer, generator, comm)

    def trainable(self, net: nn.Module) -> list[Tensor]:
        """The parameters the method updates: every one that requires grad (I-BAU may leave
        BatchNorm's out)."""
        return [p for p in net.parameters() if p.requires_grad]

    def compute_view(self, net: nn.Module, device: torch.device) -> nn.Module:
        """The module the method computes with (default: ``net``; I-BAU folds BatchNorm)."""
        return net

    def _fit(self, run: Run, setup: Setup) -> None:
        """``rounds`` rounds of :meth:`round`, one point each."""
        run.reason = f"completed {self.rounds} rounds"
        run.extras["delta"] = torch.zeros((1, *run.x.shape[1:]))
        for r in range(1, self.rounds + 1):
            t0 = time.perf_counter()
            stop = self.before_round(r, setup)
            if stop:
                run.reason = stop
                run.trace.end = run.trace.elapsed()  # the check's own work counts in the run's seconds
                break
            numbers, first_phase = self.round(r, setup, run.extras)
            seconds = time.perf_counter() - t0
            if not all_finite(setup.params):
                raise FloatingPointError(f"{self.display_name} diverged in round {r}: non-finite weights "
                                         f"({self.divergence_hint})")
            run.point(f"round {r}", round=r, **numbers, seconds=seconds, **{self.phase_key: first_phase},
                      seconds_outer=seconds - first_phase)

    #: the history field of the seconds spent on the perturbation step of a round
    phase_key = "seconds_perturbation"

    def before_round(self, r: int, setup: Setup) -> str | None:
        """Work at the start of round ``r``, counted in its seconds; a reason (a string) ends the
        run before the round, with that stop reason. The base class always goes on."""
        return None

    @abc.abstractmethod
    def round(self, r: int, setup: Setup, extras: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """One round: the perturbation step, then the outer pass. Stores the perturbation
        as ``extras["delta"]`` (on the CPU); returns the round's numbers and the seconds
        of the perturbation step."""
