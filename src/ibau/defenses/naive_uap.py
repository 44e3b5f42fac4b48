"""The naive heuristic of the I-BAU paper: adversarial training with a universal perturbation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check_choice, check_int, check_number
from ..perturbation import universal_search
from ._universal import Batch, Setup, UniversalPerturbation

__all__ = ["NaiveUAP"]

UAP_LABELS = ("predicted", "true")


class NaiveUAP(UniversalPerturbation):
    """Naive adversarial unlearning with universal adversarial perturbations (the baseline of Figure 1).

    Zeng et al., "Adversarial Unlearning of Backdoors via Implicit Hypergradient"
    (ICLR 2022), Section 4 ("A natural (but problematic) algorithm design") and
    Section 6.2 ("Stability"), Figure 1: the backdoor minimax
    ``min_theta max_{||delta|| <= C} mean_i CE(f_theta(x_i + delta), y_i)`` solved by plain
    adversarial training -- alternately (1) compute a universal adversarial perturbation
    (UAP) on the clean set for the current model and (2) fine-tune the model on clean
    data carrying that perturbation, with the ordinary gradient at the fixed ``delta``
    (Danskin-style decoupling, no implicit hypergradient). The paper reports this is
    unstable across runs (Figure 1: ACC/ASR of 20 runs against iterations); this class
    is that baseline, to be compared with :class:`ibau.defenses.ibau.IBAU`.

    Each round:

    1. *UAP step*: from ``delta = 0``, ``uap_passes`` passes over the clean batches; on
       each batch ``uap_steps`` steps of l2-normalised gradient ascent
       ``delta += uap_step_size * g / ||g||`` on the untargeted loss
       ``CE(f(x_b + delta), labels_b)``, each step followed by the projection onto the l2
       ball of radius ``norm_bound``. ``labels`` are the model's own clean predictions
       (``uap_labels="predicted"``, as I-BAU's inner problem) or the true labels.
    2. *Outer step*: one pass over the clean batches, one optimiser step per batch on
       I-BAU's outer loss ``CE(f(x_b + delta * 1[i in S]), y_b)``, S a random
       ``perturb_fraction`` of the batch (at least one image) drawn from a generator
       seeded by ``seed`` -- with the plain gradient at fixed ``delta``.

    The model stays in eval mode throughout (BatchNorm statistics frozen, dropout off),
    as in :class:`~ibau.defenses.ibau.IBAU`; every parameter that requires grad is updated.
    Each round records ``round``, ``uap_fooling_rate`` (share of the clean images whose
    prediction ``delta`` changes), ``uap_top_class`` and ``uap_top_class_share`` (the class
    most changed predictions go to, and its share of them), ``delta_norm``,
    ``outer_loss`` and timings.

    Our choices (the paper gives no settings for this baseline, only "the same setting
    for the two" in Section 6.2):

    * Everything the two methods share takes I-BAU's defaults, so that the comparison
      isolates the hypergradient: ``norm_bound=10``, Adam ``outer_lr=1e-3``, batch 100,
      ``perturb_fraction=0.01``, one outer pass per round, eval mode, seeded choice of
      the perturbed images, ``rounds=5``.
    * The UAP: the paper cites Moosavi-Dezfooli et al. (CVPR 2017), whose algorithm
      runs DeepFool per image and accumulates the steps. We use the stochastic projected
      gradient form of a UAP (as in Shafahi et al., "Universal Adversarial Training",
      AAAI 2020): cheaper, no per-image inner solver, and the same object (one
      perturbation in the l2 ball that changes as many predictions as possible).
      ``uap_steps=5`` steps per batch of length ``uap_step_size=1.0`` (a tenth of the
      radius: two batches can reach the boundary) over one pass. Like I-BAU's inner
      pass, the UAP restarts from zero each round.
    * ``norm_bound=None`` is the "best effort" setting as in I-BAU: no projection, and
      ``x + delta`` clamped to [0, 1] wherever it is formed (``clip_images`` overrides).

    Args:
        rounds: number of rounds (UAP step + outer pass).
        norm_bound: l2 radius of the perturbation, or ``None`` (no projection, clamp images).
        uap_steps: gradient-ascent steps per clean batch in the UAP step.
        uap_step_size: l2 length of each UAP step.
        uap_passes: passes over the clean batches in the UAP step.
        uap_labels: ``"predicted"`` (the model's clean predictions) or ``"true"``.
        outer_lr: step size of the outer optimiser.
        outer_optimizer: ``"adam"`` or ``"sgd"``.
        batch_size: clean batch size.
        perturb_fraction: share of each outer batch that receives ``delta``.
        normalize: ``(mean, std)`` when the model expects normalised inputs; ``delta``
            then still lives in [0, 1] pixel space.
        seed: seeds every random choice of the method.
        clip_images: clamp ``x + delta`` to [0, 1]; ``None`` (default) clamps only when
            ``norm_bound`` is ``None``.
        progress: show progress bars (tqdm) on stderr.

    Example::

        >>> result = NaiveUAP(rounds=5, seed=3).fit(model, x_clean, y_clean, evaluate=evaluate)
        >>> [(h["round"], h["asr"]) for h in result.history]   # one curve of Figure 1
    """

    name = "naive_uap"
    display_name = short_name = "Naive UAP"
    role = "heuristic"
    cost_order = 2
    phase_key = "seconds_uap"

    def __init__(self, *, rounds: int = 5, norm_bound: float | None = 10.0, uap_steps: int = 5,
                 uap_step_size: float = 1.0, uap_passes: int = 1, uap_labels: str = "predicted",
                 outer_lr: float = 1e-3, outer_optimizer: str = "adam", batch_size: int = 100,
                 perturb_fraction: float = 0.01, normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                 seed: int = 0, clip_images: bool | None = None, progress: bool = True):
        self._set_common(rounds=rounds, norm_bound=norm_bound, outer_lr=outer_lr, outer_optimizer=outer_optimizer,
                         batch_size=batch_size, perturb_fraction=perturb_fraction, normalize=normalize, seed=seed,
                         clip_images=clip_images, progress=progress)
        self.uap_steps = check_int("uap_steps", uap_steps, low=1)
        self.uap_step_size = check_number("uap_step_size", uap_step_size, low=0, low_open=True)
        self.uap_passes = check_int("uap_passes", uap_passes, low=1)
        self.uap_labels = check_choice("uap_labels", uap_labels, UAP_LABELS)

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def _predict(self, net: nn.Module, batches: list[Batch], delta: Tensor | None = None) -> list[Tensor]:
        return [net(b.x if delta is None else self._perturb(b.x, delta)).argmax(1) for b in batches]

    def universal_perturbation(self, net: nn.Module, batches: list[Batch], labels: list[Tensor]) -> Tensor:
        """The UAP step: projected, l2-normalised gradient ascent on ``CE(f(x + delta), labels)``
        from ``delta = 0``, ``uap_steps`` steps per batch (:func:`ibau.perturbation.universal_search`).
        Returns ``delta`` (1, C, H, W)."""
        return universal_search(net, [(b.x, lb) for b, lb in zip(batches, labels)], norm_bound=self.norm_bound,
                                clip=self._clip, step_size=self.uap_step_size, steps_per_batch=self.uap_steps,
                                passes=self.uap_passes)

    def outer_step(self, setup: Setup, delta: Tensor, batch: Batch) -> float:
        """One optimiser step on I-BAU's outer loss with the plain gradient at fixed ``delta``."""
        mask = self.perturbed_mask(len(batch.x), setup.generator, batch.x.device, batch.x.dtype)
        loss = F.cross_entropy(setup.net(self._perturb(batch.x, mask * delta)), batch.y)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        return float(loss.detach())

    def round(self, r: int, setup: Setup, extras: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The UAP step (with its fooling statistics), then one outer pass."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        clean_pred = self._predict(setup.net, setup.batches)
        labels = clean_pred if self.uap_labels == "predicted" else [b.y for b in setup.batches]
        delta = self.universal_perturbation(setup.net, setup.batches, labels)
        extras["delta"] = delta.detach().cpu()
        before = torch.cat(clean_pred)
        after = torch.cat(self._predict(setup.net, setup.batches, delta))
        changed = after[after != before]
        if len(changed):
            counts = torch.bincount(changed.cpu())
            top_class, top_share = int(counts.argmax()), float(counts.max()) / len(changed)
        else:
            top_class, top_share = -1, 0.0
        t_uap = time.perf_counter() - t0

        outer_total = 0.0
        steps = tqdm(setup.batches, desc=f"naive UAP round {r}/{self.rounds}", leave=False,
                     disable=not self.progress, unit="batch")
        for batch in steps:
            loss = self.outer_step(setup, delta, batch)
            outer_total += loss
            steps.set_postfix(loss=f"{loss:.3f}")
        return {"uap_fooling_rate": len(changed) / len(before), "uap_top_class": top_class,
                "uap_top_class_share": top_share, "delta_norm": float(delta.norm()),
                "outer_loss": outer_total / len(setup.batches)}, t_uap
