"""A flatness meter: how much the loss rises when the full weights are shaken with Flat-LoRA's noise.

Flat-LoRA claims to find adapters whose *full* weight ``W' = W + sBA`` sits in a flat region. This
module measures that directly, for any model the :class:`~flatlora_optim.FlatLoRA` wrapper works
on: for each radius ``sigma`` it draws the paper's per-row noise

.. math::
    \\epsilon_{ij} \\sim \\mathcal{N}\\!\\left(0, \\frac{\\sigma^2}{n} \\lVert W'_{i,:} \\rVert^2\\right)

on every LoRA-bearing weight (the same layers, the same scaling and the same private generators
as training), evaluates the user's loss at ``W + \\epsilon``, restores the weights bitwise exactly,
and reports ``E[L(W + \\epsilon)] - L(W)`` averaged over draws, with its spread.

Design points:

* The noise is drawn exactly as the optimizer draws it (:class:`~flatlora_optim.perturbation.Perturber`,
  :func:`~flatlora_optim.noise.row_std`): draw ``d`` uses the generator seeds of "step" ``d``, so
  draw ``d`` at radius ``sigma`` is the same standard-normal direction at every radius, scaled
  (common random numbers: the curve over radii is smooth, and two models with the same layer
  names get the same directions, so their curves are paired).
* Restore uses an exact strategy (``"exact"`` by default, or ``"backup"``) -- the measured model
  comes back bit for bit, even after an exception in the loss function.
* The global CPU/CUDA RNGs are never read or advanced by the meter; it has its own ``seed``.
  Put the model in eval mode (``eval_mode=True``, the default) so that dropout does not use them
  either.

Plotting (:func:`plot_flatness`) needs matplotlib (the ``plot`` extra) and imports it only when called.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .perturbation import Perturber, TargetPerturbation
from .restore import make_strategy
from .targets import LoRATarget, TargetsLike, discover_targets, on_device_of

__all__ = ["FlatnessResult", "measure_flatness", "plot_flatness", "DEFAULT_RADII"]

DEFAULT_RADII = (0.0, 0.05, 0.10, 0.15, 0.20, 0.30)
"""Relative noise radii: the paper's training range (0.05-0.15) and beyond it."""

LossFn = Callable[[nn.Module], Union[float, torch.Tensor]]


@dataclass
class FlatnessResult:
    """Loss of a model under Flat-LoRA noise of growing radius.

    Attributes:
        radii: the relative noise radii ``sigma`` measured.
        base_loss: the loss at the unperturbed weights.
        losses: ``losses[k][d]``: the loss at radius ``radii[k]`` under draw ``d``.
        seed: the meter's noise seed.
        targets: names of the perturbed weights.
    """

    radii: List[float]
    base_loss: float
    losses: List[List[float]]
    seed: int
    targets: List[str] = field(default_factory=list)

    @property
    def draws(self) -> int:
        """Noise draws per radius."""
        return len(self.losses[0]) if self.losses else 0

    @property
    def mean_increase(self) -> List[float]:
        """``E[L(W + eps)] - L(W)`` per radius (mean over draws): larger means sharper."""
        return [statistics.fmean(row) - self.base_loss for row in self.losses]

    @property
    def std_increase(self) -> List[float]:
        """Standard deviation of the loss increase over draws, per radius (0 with one draw)."""
        return [statistics.stdev(row) if len(row) > 1 else 0.0 for row in self.losses]

    @property
    def sem_increase(self) -> List[float]:
        """Standard error of :attr:`mean_increase` (std / sqrt(draws))."""
        return [s / math.sqrt(len(row)) for s, row in zip(self.std_increase, self.losses)]

    def increase_at(self, radius: float) -> float:
        """Mean loss increase at ``radius`` (one of :attr:`radii`)."""
        for r, value in zip(self.radii, self.mean_increase):
            if math.isclose(r, radius, rel_tol=1e-9, abs_tol=1e-12):
                return value
        raise KeyError(f"radius {radius} was not measured; measured radii are {self.radii}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain-JSON form with the derived curves (for result files)."""
        out = asdict(self)
        out.update(draws=self.draws, mean_increase=self.mean_increase, std_increase=self.std_increase)
        return out

    def summary(self) -> str:
        """One line per radius: ``radius  mean increase ± std``."""
        lines = [f"base loss {self.base_loss:.4f}; loss increase over {self.draws} draw(s):"]
        for r, m, s in zip(self.radii, self.mean_increase, self.std_increase):
            lines.append(f"  sigma={r:<5g} {m:+.4f} ± {s:.4f}")
        return "\n".join(lines)


def _as_float(value: Union[float, torch.Tensor]) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    return float(value)


@torch.no_grad()
def measure_flatness(
    model: nn.Module,
    loss_fn: LossFn,
    radii: Sequence[float] = DEFAULT_RADII,
    *,
    draws: int = 5,
    seed: int = 0,
    targets: TargetsLike = None,
    restore: str = "exact",
    eval_mode: bool = True,
) -> FlatnessResult:
    """Expected loss increase when every LoRA-bearing weight gets the paper's per-row noise.

    Args:
        model: the model holding the LoRA layers (peft ``lora.Linear``, ``LoRALinear``...); it is
            searched with :func:`~flatlora_optim.discover_targets`, as ``FlatLoRA`` does.
        loss_fn: ``loss_fn(model) -> float`` (or a scalar tensor): the loss on *fixed* data, e.g.
            the mean cross-entropy over a held-out batch list. It must be deterministic for the
            curve to mean anything (the meter runs it under ``torch.no_grad()``).
        radii: relative noise radii ``sigma`` (each row's noise std is ``sigma`` times that row's
            RMS, as in training with ``rho = sigma``). ``0`` gives the base loss.
        draws: noise draws per radius (> 0); their spread is reported.
        seed: the meter's noise seed (independent of the global RNG and of training's seed).
        targets: restrict or override discovery exactly like ``FlatLoRA(targets=...)``.
        restore: ``"exact"`` (default, compact) or ``"backup"``; both are bitwise. ``"subtract"``
            is refused because it drifts the weights a little on every draw.
        eval_mode: run the loss with ``model.eval()`` (dropout off; the previous mode is put back).

    Returns:
        A :class:`FlatnessResult`; the model's weights are bitwise what they were.

    Call it on clean weights, outside ``with opt.perturbed():`` of a training ``FlatLoRA`` (the meter
    would otherwise measure around ``W + e`` of the training draw). Compare models at similar
    training loss: near zero loss the softmax saturates and small noise barely moves a cross-entropy.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"Invalid draws={draws!r}: expected an int >= 1.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed {seed!r}: expected an int >= 0.")
    radii = [float(r) for r in radii]
    if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
        raise ValueError(f"Invalid radii {radii!r}: expected a non-empty list of finite numbers >= 0.")
    if restore == "subtract":
        raise ValueError("restore='subtract' drifts the weights on every draw; the flatness meter needs 'exact' or 'backup'.")
    found: List[LoRATarget] = discover_targets(model, targets)
    for target in found:
        target.check()
    perturber = Perturber(seed, make_strategy(restore))

    modes = [(module, module.training) for module in model.modules()]  # each module's own flag: eval() sets them all
    if eval_mode:
        model.eval()
    try:
        base = _as_float(loss_fn(model))
        losses: List[List[float]] = []
        for radius in radii:
            row: List[float] = []
            for draw in range(draws):
                row.append(base if radius == 0.0 else _loss_at_noise(model, loss_fn, perturber, found, radius, draw))
            losses.append(row)
    finally:
        if eval_mode:
            for module, training in modes:
                module.training = training
    return FlatnessResult(radii, base, losses, seed, [t.name for t in found])


def _loss_at_noise(model: nn.Module, loss_fn: LossFn, perturber: Perturber, found: List[LoRATarget], radius: float, draw: int) -> float:
    """Perturb every target with draw ``draw`` at ``radius``, evaluate, restore exactly (also on errors)."""
    done: List[TargetPerturbation] = []
    try:
        for target in found:
            with on_device_of([target]):  # the target's GPU current while its noise kernels launch
                done.append(perturber.perturb(target, radius, draw))
        return _as_float(loss_fn(model))
    finally:
        for p in reversed(done):
            with on_device_of([p.target]):
                perturber.restore(p)


def plot_flatness(
    results: Mapping[str, FlatnessResult],
    path: Optional[str] = None,
    *,
    title: str = "Loss under Flat-LoRA noise of the full weights",
    ax: Any = None,
) -> Any:
    """Plot loss increase against radius for several models on one figure (mean ± std over draws).

    Args:
        results: ``{label: FlatnessResult}``; each becomes one curve.
        path: where to save the figure (PNG, PDF...); nothing is saved when ``None``.
        title: the axes title.
        ax: draw into this matplotlib ``Axes`` instead of a new figure.

    Returns:
        The matplotlib ``Figure``. Needs matplotlib (``pip install "flatlora-optim[plot]"``); uses the
        object-oriented API, so no global pyplot state or backend is changed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('plot_flatness needs matplotlib: pip install "flatlora-optim[plot]"') from exc
    if ax is None:
        fig = Figure(figsize=(5.5, 3.8), dpi=110)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    for label, result in results.items():
        ax.errorbar(result.radii, result.mean_increase, yerr=result.std_increase, marker="o", capsize=3, label=label)
    ax.set_xlabel("relative noise radius sigma")
    ax.set_ylabel("loss increase  E[L(W+eps)] - L(W)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if path is not None:
        fig.tight_layout()
        fig.savefig(path)
    return fig
