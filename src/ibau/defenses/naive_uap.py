"""The naive heuristic of the I-BAU paper: adversarial training with a universal perturbation."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import model_device
from .base import Defense, DefenseResult, Evaluate, StopWhen, Trace, check_images
from .ibau import OPTIMIZERS, UniversalPerturbation, _optimizer

__all__ = ["NaiveUAP"]

UAP_LABELS = ("predicted", "true")


class NaiveUAP(UniversalPerturbation, Defense):
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
    data_role = "clean"

    def __init__(
        self,
        *,
        rounds: int = 5,
        norm_bound: float | None = 10.0,
        uap_steps: int = 5,
        uap_step_size: float = 1.0,
        uap_passes: int = 1,
        uap_labels: str = "predicted",
        outer_lr: float = 1e-3,
        outer_optimizer: str = "adam",
        batch_size: int = 100,
        perturb_fraction: float = 0.01,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        seed: int = 0,
        clip_images: bool | None = None,
        progress: bool = True,
    ):
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        if norm_bound is not None and not (isinstance(norm_bound, (int, float)) and math.isfinite(norm_bound)
                                           and norm_bound > 0):
            raise ValueError(f"norm_bound must be a positive number or None, got {norm_bound!r}")
        for key, value in (("uap_steps", uap_steps), ("uap_passes", uap_passes), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        for key, value in (("uap_step_size", uap_step_size), ("outer_lr", outer_lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        if uap_labels not in UAP_LABELS:
            raise ValueError(f"uap_labels must be one of {UAP_LABELS}, got {uap_labels!r}")
        if outer_optimizer not in OPTIMIZERS:
            raise ValueError(f"outer_optimizer must be one of {sorted(OPTIMIZERS)}, got {outer_optimizer!r}")
        if not (isinstance(perturb_fraction, (int, float)) and 0 < perturb_fraction <= 1):
            raise ValueError(f"perturb_fraction must be in (0, 1], got {perturb_fraction!r}")
        if clip_images is not None and not isinstance(clip_images, bool):
            raise ValueError(f"clip_images must be True, False or None, got {clip_images!r}")
        self.rounds = rounds
        self.norm_bound = norm_bound
        self.uap_steps = uap_steps
        self.uap_step_size = uap_step_size
        self.uap_passes = uap_passes
        self.uap_labels = uap_labels
        self.outer_lr = outer_lr
        self.outer_optimizer = outer_optimizer
        self.batch_size = batch_size
        self.perturb_fraction = perturb_fraction
        self.normalize = normalize
        self.seed = seed
        self.clip_images = clip_images
        self.progress = progress

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def _predict(self, net: nn.Module, batches: list[tuple[Tensor, Tensor]],
                 delta: Tensor | None = None) -> list[Tensor]:
        return [net(xb if delta is None else self._perturb(xb, delta)).argmax(1) for xb, _ in batches]

    def universal_perturbation(self, net: nn.Module, batches: list[tuple[Tensor, Tensor]],
                               labels: list[Tensor]) -> Tensor:
        """The UAP step: projected, l2-normalised gradient ascent on ``CE(f(x + delta), labels)``
        from ``delta = 0``, ``uap_steps`` steps per batch. Returns ``delta`` (1, C, H, W)."""
        x0 = batches[0][0]
        delta = torch.zeros((1, *x0.shape[1:]), device=x0.device, dtype=x0.dtype)
        for _ in range(self.uap_passes):
            for (xb, _), lb in zip(batches, labels):
                for _ in range(self.uap_steps):
                    d = delta.requires_grad_(True)
                    loss = F.cross_entropy(net(self._perturb(xb, d)), lb)
                    (g,) = torch.autograd.grad(loss, [d])
                    gn = float(g.norm())
                    delta = delta.detach()
                    if gn == 0 or not math.isfinite(gn):
                        break  # flat (or broken) loss: no ascent direction on this batch
                    delta = self.project(delta + (self.uap_step_size / gn) * g)
        return delta.detach()

    # ------------------------------------------------------------------ driver
    def fit(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        evaluate: Evaluate | None = None,
        stop_when: StopWhen | None = None,
    ) -> DefenseResult:
        """Adversarially fine-tune ``model`` in place with universal perturbations.

        Args:
            model: a classifier taking float NCHW images in [0, 1] (or normalised inputs
                with ``normalize`` set), returning logits. Its device is used.
            x: clean images (N, C, H, W), float in [0, 1]; kept in this order.
            y: their labels (N,).
            evaluate: optional ``evaluate(model) -> dict`` called before the first and
                after every round; its numbers join the history (not timed).
            stop_when: optional ``stop_when(record) -> bool | str`` called after each round.

        Returns:
            :class:`DefenseResult` with the model, per-round history and, in
            ``extras["delta"]``, the last universal perturbation (1, C, H, W) on the CPU.
        """
        from tqdm.auto import tqdm

        x, y = check_images(x, y)
        device = model_device(model)
        net = self.wrap(model)
        was_training = model.training
        net.eval()
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameters that require grad")
        outer_opt = _optimizer(self.outer_optimizer, params, self.outer_lr)
        generator = torch.Generator().manual_seed(self.seed)
        dtype = params[0].dtype if params[0].is_floating_point() else torch.float32
        batches = self.clean_batches(x, y, device, dtype)

        trace = Trace(evaluate, stop_when)
        delta = torch.zeros((1, *x.shape[1:]))
        try:
            with trace.run(model):
                for r in range(1, self.rounds + 1):
                    t0 = time.perf_counter()
                    clean_pred = self._predict(net, batches)
                    labels = clean_pred if self.uap_labels == "predicted" else [yb for _, yb in batches]
                    delta = self.universal_perturbation(net, batches, labels)
                    before = torch.cat(clean_pred)
                    after = torch.cat(self._predict(net, batches, delta))
                    changed = after[after != before]
                    fooling = len(changed) / len(before)
                    if len(changed):
                        counts = torch.bincount(changed.cpu())
                        top_class, top_share = int(counts.argmax()), float(counts.max()) / len(changed)
                    else:
                        top_class, top_share = -1, 0.0
                    t_uap = time.perf_counter() - t0

                    outer_total = 0.0
                    steps = tqdm(batches, desc=f"naive UAP round {r}/{self.rounds}", leave=False,
                                 disable=not self.progress, unit="batch")
                    for xb, yb in steps:
                        n = len(xb)
                        sel = torch.zeros(n, 1, 1, 1, device=device, dtype=xb.dtype)
                        sel[self.choose_perturbed(n, generator).to(device)] = 1.0
                        loss = F.cross_entropy(net(self._perturb(xb, sel * delta)), yb)
                        outer_opt.zero_grad(set_to_none=True)
                        loss.backward()
                        outer_opt.step()
                        outer_total += float(loss.detach())
                        steps.set_postfix(loss=f"{float(loss.detach()):.3f}")
                    seconds = time.perf_counter() - t0
                    if not all(math.isfinite(float(p.detach().abs().sum())) for p in params):
                        raise FloatingPointError(f"naive UAP training diverged in round {r}: non-finite weights "
                                                 "(lower outer_lr)")
                    trace.point(model, f"round {r}", round=r, uap_fooling_rate=fooling, uap_top_class=top_class,
                                uap_top_class_share=top_share, delta_norm=float(delta.norm()),
                                outer_loss=outer_total / len(batches), seconds=seconds, seconds_uap=t_uap,
                                seconds_outer=seconds - t_uap)
        finally:
            for p in params:
                p.grad = None
            model.train(was_training)
        for rec in trace.history:
            if rec["point"] == "before":
                rec["round"] = 0
        return trace.result(model, {"delta": delta.detach().cpu()}, default_reason=f"completed {self.rounds} rounds")
