"""``FlatLoRA``: the optimizer wrapper that trains LoRA adapters at noisy full weights.

One optimizer step, top to bottom:

1. ``perturb()`` (entering ``with opt.perturbed():``) computes ``sigma_t`` from the schedule
   and, for every target found by :func:`~flatlora_optim.targets.discover_targets`, writes
   ``W + e`` into the frozen weight (:class:`~flatlora_optim.perturbation.Perturber`); the draw
   is fixed by ``(seed, step, layer)``, so every micro-batch of the step sees the same noise.
2. The user's forward and backward run at ``W + e``: the LoRA gradient is the gradient of
   ``L(W + sBA + e)``.
3. ``restore()`` (leaving the block) puts the original bits back. If a graph built in the block
   still waits for its backward, the restore waits for the end of that backward pass.
4. ``step()`` makes sure the weights are clean, steps the wrapped optimizer and counts the step.

The wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
``defaults`` are the wrapped optimizer's own objects, so LR schedulers, ``GradScaler``,
accelerate and Lightning see one optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .callers import stacklevel_outside
from .claims import claim, release
from .clean_reruns import CleanRerunWatch
from .describe import describe_targets, format_targets
from .guards import PerturbationGuards
from .host_restore import EarlyRestore
from .interrupts import interrupts_deferred
from .perturbation import Perturber, TargetPerturbation
from .restore import STRATEGY_NAMES, make_strategy
from .schedule import NoiseSchedule, ScheduleLike, as_int, as_real
from .sharding import check_row_sharded
from .shared_memory import check_shared_memory, warn_of_tensors_holding_targets
from .steady import SteadyReads
from .targets import LoRATarget, TargetsLike, discover_targets, held_views, on_device_of
from .virtual import VirtualPatches, virtual_refusal

__all__ = ["FlatLoRA"]

_logger = logging.getLogger("flatlora_optim")

_STATE_VERSION = 1


def _resharded(model: nn.Module, targets: List[LoRATarget], sharded_names: Any) -> None:
    """Put FSDP2's sharded parameters back in place before the noise goes in: with ``reshard_after_forward=False`` a
    forward (an evaluation under ``no_grad``) leaves the unsharded copies registered, and noise added to those would
    never reach the shards the next forward gathers from. ``reshard()`` frees those copies (no communication)."""
    if not sharded_names or not any(t.name in sharded_names and not t.sharded for t in targets):
        return
    for module in model.modules():
        if callable(getattr(module, "reshard", None)) and type(module).__name__.startswith("FSDP"):
            module.reshard()
    unsharded = [t.name for t in targets if t.name in sharded_names and not t.sharded]
    if unsharded:
        raise RuntimeError(
            f"FSDP2 holds {unsharded[:3]} unsharded and reshard() did not shard them again: Flat-LoRA perturbs the shards. "
            "Call opt.perturbed() where FSDP2 holds the parameters sharded (before the step's first forward)."
        )


def _is_zero(lr: Any) -> bool:
    """Whether a param group's learning rate is 0 (``None``, Adafactor's relative step, is not)."""
    return as_real(lr) == 0.0


def _every_lr_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group of ``optimizer`` has learning rate 0, as at ``torch.distributed.checkpoint``'s state
    initialisation."""
    return all(_is_zero(group.get("lr")) for group in optimizer.param_groups)


class _OnWrappedOptimizer:
    """An attribute of :class:`FlatLoRA` that lives on the wrapped optimizer (unset there: ``AttributeError``, so that
    ``getattr(opt, name, default)`` works)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj.base_optimizer, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.base_optimizer, self.name, value)

    def __delete__(self, obj: Any) -> None:
        obj.base_optimizer.__dict__.pop(self.name, None)


_STEPPED_BY_A_WRAPPER: Set[int] = set()
"""``id``s of the wrapped optimizers whose ``step`` a :class:`FlatLoRA` is running (any wrapper of the same optimizer)."""


class _StepsElsewhere:
    """A step post-hook on the wrapped optimizer: warns once when it steps other than through :meth:`FlatLoRA.step`
    (``inner.step()``, ``scaler.step(inner)``), which leaves the noise schedule where it was -- at the cosine ramp's
    start, no noise at all. Holds the wrapper weakly: a wrapper no longer used does not keep warning."""

    __slots__ = ("owner",)

    def __init__(self, owner: FlatLoRA):
        self.owner = weakref.ref(owner)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        owner = self.owner()
        if owner is None or id(optimizer) in _STEPPED_BY_A_WRAPPER or owner._warned_steps_elsewhere:
            return
        if _every_lr_zero(optimizer) or _called_by_checkpoint_state_init():
            return  # torch.distributed.checkpoint's state initialisation given the wrapped optimizer: no training step
        owner._warned_steps_elsewhere = True
        warnings.warn(
            f"{type(optimizer).__name__}.step() ran without FlatLoRA.step(): Flat-LoRA's noise schedule did not advance "
            f"(step_count {owner.step_count}, sigma {owner.sigma:.4g}). Step the FlatLoRA wrapper instead of the optimizer "
            "it wraps: opt.step(), scaler.step(opt), and give the wrapper to LR schedulers and frameworks.",
            RuntimeWarning,
            stacklevel=stacklevel_outside(),  # the caller's inner.step() (or scheduler, GradScaler...) line
        )


class _Inert:
    """What a copied or unpickled :class:`_AfterStepInBlock` hook becomes: a forward pre-hook that does nothing."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any) -> None:
        return None


class _AfterStepInBlock:
    """Base of the forward pre-hooks that a ``step()`` inside a ``perturbed()`` block puts on the model and its LoRA
    layers until the block ends (see :meth:`FlatLoRA._draw_at_next_forward`). Holds the wrapper weakly; its subclasses
    run outside ``torch.compile``'s tracing (a hook on a compiled model would be traced, with the noise code). The
    weights are clean while it waits, so a copy of the model may be taken: the copy gets an inert hook."""

    __slots__ = ("owner",)

    def __init__(self, owner: FlatLoRA):
        self.owner = weakref.ref(owner)

    def _waiting(self, module: nn.Module) -> Optional[FlatLoRA]:
        """The wrapper, while ``module`` runs in training mode inside the block before the next step's noise is drawn."""
        owner = self.owner()
        if owner is not None and owner._depth and owner._perturbations is None and module.training:
            return owner
        return None

    def __reduce_ex__(self, protocol: object) -> Tuple[type, Tuple[()]]:
        return _Inert, ()


class _DrawAgainInBlock(_AfterStepInBlock):
    """On the model: draws the next step's noise before the block's next forward in training mode."""

    __slots__ = ()

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Any) -> None:
        owner = self._waiting(module)
        if owner is not None:
            owner._apply_noise()


class _WarnUndrawn(_AfterStepInBlock):
    """On each LoRA layer: warns once when a layer computes in training mode before the model's call drew the next
    step's noise (a loop that calls a submodule of the model given to FlatLoRA: its steps after the first would run at
    the clean weights, silently). Warns only: a layer's hook may run after FSDP2 gathered its shards, where no noise
    may go in."""

    __slots__ = ()

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Any) -> None:
        owner = self._waiting(module)
        if owner is None or owner._warned_undrawn:
            return
        owner._warned_undrawn = True
        warnings.warn(
            "A LoRA layer ran inside opt.perturbed() after opt.step() without the next step's noise: inside a block, the "
            "noise of each step after the first is drawn when the model given to FlatLoRA is called, and this loop called "
            "another module. Call that model, give FlatLoRA the module the loop calls, or use one block per step.",
            RuntimeWarning,
            stacklevel=2,
        )


class FlatLoRA(torch.optim.Optimizer):
    """Wrap a LoRA optimizer so that every step's gradient is taken at ``W + sBA + e``.

    .. math::
        \\min_{A,B} \\; \\mathbb{E}_{\\epsilon}\\, L(W + sBA + \\epsilon), \\qquad
        \\epsilon_{ij} \\sim \\mathcal{N}\\big(0, \\tfrac{\\sigma_t^2}{n} \\lVert (W + sBA)_{i,:} \\rVert^2\\big)

    Args:
        optimizer: the optimizer of the LoRA parameters (e.g. ``torch.optim.AdamW``).
        model: the model holding the LoRA layers; searched for targets by introspection.
        rho: largest relative noise level ``sigma`` (paper: 0.05 for language, up to 0.15).
        total_steps: optimizer steps of the whole run (needed by ``"cosine"`` and ``"linear"``).
        schedule: ``"cosine"`` (default), ``"linear"``, ``"constant"`` or ``factor(step)``.
        seed: seed of the private noise generators (the global RNGs are never used).
        targets: restrict or override discovery: a regex (full match), a list of module names
            or name suffixes, or ``callable(name, module) -> bool``.
        restore: ``"exact"`` (default; bitwise, about 2-6% extra memory), ``"backup"`` (bitwise,
            a full copy), ``"host"`` (bitwise, a copy in host memory kept from step to step, written back
            layer by layer during the backward: no device memory; see :mod:`flatlora_optim.host_restore`)
            or ``"subtract"`` (the paper's ``W~ - e``; drifts, not exact).
        rank_noise: under ``torch.distributed`` (DDP), ``"independent"`` (default: each rank draws its
            own noise, stream ``rank``; rank 0 draws what one process would) or ``"shared"`` (every
            rank draws the same noise).
        mode: ``"inplace"`` (default: ``W + e`` is written into the weights and restored) or
            ``"virtual"`` (the weights are never written: each layer's product uses a temporary
            ``W + e``, regenerated in backward; see :mod:`flatlora_optim.virtual`).

    Example::

        opt = FlatLoRA(torch.optim.AdamW(lora_params, lr=2e-4), model, rho=0.05, total_steps=1000)
        for x, y in loader:
            with opt.perturbed():
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        rho: float = 0.05,
        *,
        total_steps: Optional[int] = None,
        schedule: ScheduleLike = "cosine",
        seed: int = 0,
        targets: TargetsLike = None,
        restore: str = "exact",
        mode: str = "inplace",
        rank_noise: str = "independent",
    ):
        if isinstance(optimizer, FlatLoRA):
            raise ValueError("The optimizer is already a FlatLoRA; wrap the plain optimizer once.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"FlatLoRA wraps a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if _is_accelerate_prepared(optimizer):
            raise ValueError(
                f"FlatLoRA was given accelerate's prepared optimizer ({type(optimizer).__name__}). Wrap the plain optimizer, "
                "then prepare the FlatLoRA: opt = FlatLoRA(torch.optim.AdamW(...), model, ...); model, opt = "
                "accelerator.prepare(model, opt). The other way round, every micro-batch of a gradient-accumulation window "
                "would count as an optimizer step and draw new noise (accelerate skips those steps inside its wrapper)."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module holding the LoRA layers, got {type(model).__name__}.")
        self.schedule, seed = check_settings(rho, schedule, total_steps, seed=seed, restore=restore, mode=mode, rank_noise=rank_noise)
        self.base_optimizer = optimizer
        self.model = model
        # DDP and torch.compile wrappers add a name prefix ("module.", "_orig_mod."); targets are
        # named as in the bare model so that the noise does not depend on the wrapping.
        self.targets: List[LoRATarget] = discover_targets(_unwrap(model), targets)
        for target in self.targets:
            target.check()
        _check_one_device(self.targets)
        _check_sharding(self.targets, mode)
        if mode == "virtual":
            _check_virtual(model, self.targets)
        else:
            warn_of_tensors_holding_targets(model, self.targets)
        self.mode = mode
        _check_optimizer_holds_adapters(optimizer, self.targets)
        trainable = [t.name for t in self.targets if t.weight.requires_grad]
        if trainable:
            warnings.warn(
                f"Flat-LoRA perturbs base weights that require grad ({trainable[:3]}...): they will receive gradients at "
                "W + e and, if the optimizer holds them, be updated. Freeze base weights for LoRA training.",
                stacklevel=2,
            )
        self._strategy = make_strategy(restore)
        self._perturber = Perturber(seed, self._strategy)
        self.rank_noise = rank_noise
        _logger.info("Flat-LoRA targets (%s mode):\n%s", mode, format_targets(self.targets))
        self._step_index = 0
        self._perturbations: Optional[List[TargetPerturbation]] = None
        self._unrestored: List[str] = []  # layers a restore raised for (see _check_restored)
        self._sharded_names = {t.name for t in self.targets if t.sharded}  # FSDP2 weights (see _resharded)
        self._virtual_verified = False  # a block has seen every LoRA layer that ran go through its rerouted product
        self._guards: Optional[PerturbationGuards] = None
        self._patches: Optional[VirtualPatches] = None
        self._early: Optional[EarlyRestore] = None  # host restore: the layers restored during the backward
        self._steady = SteadyReads()  # what the last step read from the layers, while none of them changed
        # torch.compile traces the layers' forward pre-hooks into its graph: there, host restore restores at the end only
        self._early_restore_allowed = not _is_compiled(model)
        self._in_final_backward = False  # inside final_backward(): host restore may write layers back while the noise is held
        self._depth = 0  # nesting of perturbed() blocks
        self._held = False  # perturb() called without restore()
        # step(closure) runs the closure at the noise perturb() holds instead of drawing it again: set by an integration that
        # knows nothing moves the adapters between its perturb() and the step (the Lightning callback, automatic optimization)
        self._closure_reuses_held_noise = False
        # whether a closure given to step() computes at all: set by an integration that can tell one that does not (the
        # Lightning callback: Lightning's own empty closure in manual optimization), which then runs without the noise
        self._closure_computes: Optional[Callable[[Callable[[], Any]], bool]] = None
        # the run's length is set after a checkpoint is loaded: set by an integration that builds the wrapper and sets
        # total_steps from its framework's count once training starts (a loaded state's other length then says nothing)
        self._length_set_after_loading = False
        self.peak_restore_bytes = 0
        self._init_optimizer_hooks()
        self._warned_steps_elsewhere = False
        self._redraw_handle: Optional[RemovableHandle] = None  # see _draw_at_next_forward
        self._undrawn_handles: List[RemovableHandle] = []  # ... and _WarnUndrawn
        self._warned_undrawn = False
        # from the noise's coming off to the next draw or step: a layer rerun inside a backward (checkpointing) raises
        self._rerun_watch = CleanRerunWatch(self, [(layer.name, layer.module) for t in self.targets for layer in t.layers()])
        self._computed_at_noise = False  # a LoRA layer computed at this step's noise (or sigma was 0): see _warn_if_no_block
        self._reruns_possible = False  # a graph of this step built at the noise may rerun after it came off (see _restore_now)
        self._warned_no_block = False
        if hasattr(optimizer, "_optimizer_step_post_hooks"):  # (timm's Lookahead skips Optimizer.__init__: no hooks there)
            # removed with the wrapper: a loop that builds wrapper after wrapper around one optimizer leaves none behind
            weakref.finalize(self, optimizer.register_step_post_hook(_StepsElsewhere(self)).remove)

    def _init_optimizer_hooks(self) -> None:
        # What torch.optim.Optimizer.__init__ sets up, minus building param_groups: those are
        # the wrapped optimizer's own list (see the properties below).
        self._optimizer_step_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._step_supports_amp_scaling = getattr(self.base_optimizer, "_step_supports_amp_scaling", False)
        self._patch_step_function()

    # -- shared optimizer state -------------------------------------------------------------------

    # GradScaler hands an optimizer that unscales inside its step (``_step_supports_amp_scaling``: the fused ones)
    # the scale and the inf flag as these two attributes, set before step() and deleted after it; the wrapped
    # optimizer is the one that reads them.
    grad_scale = _OnWrappedOptimizer()
    found_inf = _OnWrappedOptimizer()
    # Schedule-free optimizers (``schedulefree.AdamWScheduleFree``...) switch their parameters between the training and
    # the evaluation point with these two; transformers' Trainer and accelerate call them where the optimizer has them.
    # They are the wrapped optimizer's (absent there: ``AttributeError``, so ``hasattr(opt, "train")`` tells as it would).
    train = _OnWrappedOptimizer()
    eval = _OnWrappedOptimizer()

    @property  # type: ignore[override]
    def param_groups(self) -> List[Dict[str, Any]]:
        """The wrapped optimizer's ``param_groups`` (the same list object)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Dict[Any, Any]:
        """The wrapped optimizer's ``state`` (the same dict object)."""
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Dict[Any, Any]) -> None:
        self.base_optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> Dict[str, Any]:
        """The wrapped optimizer's ``defaults``."""
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    # -- public read-outs ----------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far: ``t`` in ``sigma_t``."""
        return self._step_index

    @property
    def sigma(self) -> float:
        """``sigma_t`` for the current step (the noise the next ``perturb()`` draws)."""
        return self.schedule.sigma(self._step_index)

    @property
    def seed(self) -> int:
        return self._perturber.seed

    @property
    def restore_strategy(self) -> str:
        return self._strategy.name

    @property
    def is_perturbed(self) -> bool:
        """True while noise is in the weights (in virtual mode: while the layers compute with it).

        False at ``sigma_t = 0`` (the first step of the cosine ramp), when nothing is drawn. True after a
        restore that raised for some layers (their weights may still hold noise; see :meth:`_check_restored`)."""
        return bool(self._perturbations) or bool(self._unrestored)

    @property
    def restore_bytes(self) -> int:
        """Bytes held right now to restore the weights (0 when clean)."""
        if not self._perturbations:
            return 0
        return sum(p.nbytes(self._strategy) for p in self._perturbations)

    @property
    def perturbed_bytes(self) -> int:
        """Bytes of all target weights (what a full backup would cost)."""
        return sum(t.weight.numel() * t.weight.element_size() for t in self.targets)

    def refresh_host_copies(self) -> None:
        """``restore="host"``: take the host copies of the weights anew at the next step.

        They are taken again by themselves when a weight's version counter moved (any in-place write through the
        parameter, ``load_state_dict``). Call this after writing a frozen weight some other way (``weight.data``)."""
        self._refuse_inside_block("refresh_host_copies", "Call it before entering the block (or after the step).")
        if self._perturbations:
            raise RuntimeError("refresh_host_copies() while the noise is in the weights: call it after the step's restore.")
        if self._perturber.host_copies is not None:
            self._perturber.host_copies.forget()

    def set_total_steps(self, total_steps: int) -> None:
        """Set ``T`` once it is known (frameworks learn the number of optimizer steps after building
        the optimizer); the schedule's name and ``rho`` are kept."""
        self.schedule = NoiseSchedule(self.schedule.rho, self.schedule.schedule, total_steps)

    def describe(self) -> List[Dict[str, Any]]:
        """One row per target: name, flavour, weight shape, rows, fan-in, adapters counted, bytes."""
        return describe_targets(self.targets)

    # -- perturb / restore ---------------------------------------------------------------------

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[FlatLoRA]:
        """Noise in the weights for the body of the block; exact restore once the gradient is known.

        ``backward()`` may run inside the block or right after it: when the block ends with a
        graph still waiting for its backward, the restore happens at the end of that backward
        pass. On an exception the weights are restored at once. Blocks may be nested; entering
        twice in one optimizer step (gradient accumulation) reuses the same draw (with ``restore="subtract"``
        almost: each restore drifts ``W`` in its last bits, and the next block's row stds read the drifted ``W``).
        A ``step()`` inside the block restores the weights, and the block's next call of the model in training mode
        draws the next step's noise: a training loop inside one block runs as a block per step.
        """
        self._depth += 1
        try:
            self._apply_noise()
            yield self
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._stop_drawing_in_block()
                self.restore(force=True)
            raise
        self._depth -= 1
        if self._depth == 0:
            self._stop_drawing_in_block()
            self._verify_rerouting()
        self._release()

    def _draw_at_next_forward(self) -> None:
        """After a ``step()`` inside a :meth:`perturbed` block: the block's next call of the model in training mode draws
        the next step's noise (a forward pre-hook on the model, until the block ends), as a new block would; without it,
        a loop inside one block would compute every step after the first at the clean weights. A forward in eval mode
        (an evaluation inside the loop) runs at the clean weights."""
        if self._redraw_handle is None:  # first in line: before FSDP2's pre-hook gathers the shards
            self._redraw_handle = self.model.register_forward_pre_hook(_DrawAgainInBlock(self), prepend=True)
            if not self._warned_undrawn:  # a loop that calls a submodule: its layers would run clean, silently
                self._undrawn_handles = [t.module.register_forward_pre_hook(_WarnUndrawn(self)) for t in self.targets]

    def _stop_drawing_in_block(self) -> None:
        """Take out the hooks :meth:`_draw_at_next_forward` put on the model and its layers (the block ended)."""
        if self._redraw_handle is not None:
            self._redraw_handle.remove()
            self._redraw_handle = None
        for handle in self._undrawn_handles:
            handle.remove()
        self._undrawn_handles = []

    def _verify_rerouting(self) -> None:
        """Virtual mode, until a block has seen the LoRA layers run: refuse layers that ran without the rerouted product
        (their forward reads the base weight itself), whose gradients would then carry no noise."""
        patches = self._patches
        if patches is None or not patches.watching or not patches.ran:
            return
        unrouted = patches.unrouted()
        patches.stop_watching()
        self._virtual_verified = not unrouted
        if unrouted:
            self.restore(force=True)
            raise ValueError(
                f"mode='virtual' rerouted no product of {unrouted[:3]}: their forward ran without calling the module that holds "
                "the weight (it reads the weight itself, e.g. F.linear(x, self.base.weight)), so they computed without the "
                "noise. Call the base module in the layer's forward (self.base(x)), or use mode='inplace'."
            )

    def perturb(self) -> None:
        """Put this step's noise into the weights (idempotent within a step). Pair with :meth:`restore`.

        If it raises, the weights are clean (outside a :meth:`perturbed` block, which then restores)."""
        self._held = True
        try:
            self._apply_noise()
        except BaseException:
            self._held = False
            if self._depth == 0:
                self._restore_now()  # nothing to do unless the noise was in place when the error came
            raise

    @contextlib.contextmanager
    def final_backward(self) -> Iterator[None]:
        """Run the step's last backward in this block when the noise is held by :meth:`perturb` (gradient accumulation:
        every micro-batch computes at the same ``W + e``, and the noise stays in until the last one's backward).

        With ``restore="host"`` each layer is then written back as soon as that backward is done with it, its copy
        back to the device running beside the rest of the backward, instead of all layers at once after it. When
        the block ends the noise is released (:meth:`restore`). The gradients are the same: the backward computes
        at ``W + e`` (a layer written back early is done with); a layer that computes again before the step's restore
        gets its noise back first. Nothing after this backward in the step should read the weights at ``W + e`` (a
        second backward through its graph, a weight read outside its layer's forward): run a backward that keeps its
        graph (``retain_graph=True``) outside this block instead, and before a later forward put the noise back with
        :meth:`perturb` (the same draw). With the other restores the block only releases the noise at its end. Inside a
        :meth:`perturbed` block, which keeps the noise to its end, it does nothing. If the backward raises, the noise
        stays held (restore as after any failed step).
        """
        self._in_final_backward = True
        try:
            yield
        finally:
            self._in_final_backward = False
        self._release_held()

    @contextlib.contextmanager
    def _noise_for_closure(self) -> Iterator[None]:
        """One call of :meth:`step`'s closure at ``W + e``: the noise held as by :meth:`perturb` rather than by a
        :meth:`perturbed` block, so that a :meth:`final_backward` around the closure's backward (the Lightning
        callback's) may release it during that backward -- layer by layer with host restore; otherwise it is
        released when the closure returns (at the end of a backward still pending), as a block's end would."""
        self.perturb()
        try:
            yield
        except BaseException:
            self._held = False
            if self._depth == 0:
                self._restore_now()
            raise
        self._release_held()

    def _release_held(self) -> None:
        """Release the noise :meth:`perturb` holds (:meth:`restore`), checking virtual mode's rerouting first where no
        block is open, as a :meth:`perturbed` block's end does: the noise is released here, not there."""
        if self._depth == 0:
            self._verify_rerouting()
        self.restore()

    def restore(self, force: bool = False) -> None:
        """Take the noise out of the weights, bitwise exactly.

        If a forward at the noisy weights still waits for its backward, the restore is done at
        the end of that backward pass (restoring now would corrupt its gradient); ``force=True``
        restores now, and a later backward through that graph then raises (in-place mode: a ``RuntimeError`` saying so).
        """
        self._held = False
        if force:
            self._restore_now()
        else:
            self._release()

    def _release(self) -> None:
        if self._depth or self._held or self._perturbations is None:
            return
        self._rerun_watch.let_go_here()  # graphs built from here on are not built at the noise (unless a block takes it again)
        if self._guards is not None and self._guards.pending():
            return  # called again by the guards when a backward ends or a graph is released
        self._restore_now(watch_reruns=True)

    @torch.no_grad()
    def _apply_noise(self) -> None:
        if self._perturbations is not None:
            return
        self._check_restored()
        if not self._steady.unchanged(self.targets):  # a layer changed since the last step (or none was read yet)
            for target in self.targets:
                target.check()  # e.g. merged since construction: raise before touching anything
            _check_one_device(self.targets)
            check_shared_memory(self.targets)  # e.g. b.weight = nn.Parameter(a.weight.data) since construction
            self._steady.confirm()
        sigma = self.schedule.sigma(self._step_index)
        self._perturber.stream = _rank() if self.rank_noise == "independent" else 0
        if sigma == 0.0:
            self._perturbations = []  # nothing to draw this step: later calls in the step do nothing either
            self._computed_at_noise = True  # (no noise to compute at: the step warns of nothing)
            return
        _resharded(self.model, self.targets, self._sharded_names)
        # a Ctrl-C comes once the noise is in and recorded (the caller's error path then restores it): between a layer's
        # write and its record, or the record and the guards, it would leave noise that nothing restores
        with interrupts_deferred():
            claim(self, self.targets)  # another wrapper's noise in these weights: refused before anything is written
            self._rerun_watch.noise_in()
            try:
                with on_device_of(self.targets), held_views(self.targets, self._steady):
                    self._add_noise(sigma)
                    for target in self.targets:
                        target._pinned = target.weight if target.sharded else None
            except BaseException:
                release(self, self.targets)
                raise

    def _add_noise(self, sigma: float) -> None:
        """Draw this step's noise and put it in place. ``self._perturbations`` is set only once it is in
        place: after a failure (which leaves the weights clean) a later call of the step draws again."""
        if self.mode == "virtual":
            perturbations, _ = self._perturber.describe_all(self.targets, sigma, self._step_index, self._steady)
            self._patches = VirtualPatches(self._perturber, perturbations, self._armed,  # removes what it patched if it fails
                                           watch=not self._virtual_verified)
            try:  # a graph the model's output carries keeps the layers rerouted until its backward (checkpointing reruns them)
                self._guards = PerturbationGuards(self.targets, self._clean_weight, self._release, self._on_mode_change,
                                                  root=self.model, layers=False)
            except BaseException:
                self._patches.remove()
                self._patches = None
                raise
            self._perturbations = perturbations
            return
        installed: List[PerturbationGuards] = []

        def install_guards() -> None:  # while the device runs the noise pass (exact restore: before the host waits for it)
            installed.append(PerturbationGuards(
                self.targets, self._clean_weight, self._release, self._on_mode_change,
                root=self.model, on_conversion=self._on_conversion,
            ))

        try:
            self._perturbations = self._perturber.perturb_all(self.targets, sigma, self._step_index, install_guards,  # restores itself on error
                                                              self._steady)
        except BaseException:
            for guards in installed:
                guards.remove()
            raise
        self._guards = installed[0]
        if self._strategy.name == "host" and self._early_restore_allowed:
            self._early = self._install_early_restore(self._perturbations)  # if this raises, the noise is put back by the caller's error path
        self.peak_restore_bytes = max(self.peak_restore_bytes, self.restore_bytes)

    def _install_early_restore(self, perturbations: List[TargetPerturbation]) -> Optional[EarlyRestore]:
        """Host restore: restore each layer during the backward once autograd is done with its weight (see
        :class:`~flatlora_optim.host_restore.EarlyRestore`). Not for FSDP2 shards, nor for weights that a
        module other than their LoRA layers also computes with (a tied ``lm_head``): those wait for the end."""
        layers = [([layer.module for layer in p.target.layers()], functools.partial(self._perturber.restore_early, p),
                   functools.partial(self._perturber.perturb_again, p))
                  for p in perturbations if p.blocks and not p.target.sharded and not p.target.tied]
        if not layers:
            return None
        # in final_backward() while perturb() holds the noise, not inside a perturbed() block (which keeps it to its end)
        return EarlyRestore(layers, may_restore=lambda: (self._in_final_backward and self._depth == 0) or not self._armed())

    @torch.no_grad()
    def _restore_now(self, watch_reruns: bool = False) -> None:
        """Take the noise out now. ``watch_reruns``: the noise is let go (a block's end, a ``restore()``, a backward's
        end; not ``step()`` or an error), so where a graph of the step built at the noise may still rerun (a layer
        computed without grad at it, or a backward kept its graph), :class:`~flatlora_optim.clean_reruns.CleanRerunWatch`
        refuses such a rerun until the next draw or the step. A Ctrl-C meanwhile comes once it is done: between the
        record's hand-over and the layers' restore it would leave noise that nothing restores any more."""
        with interrupts_deferred():
            self._take_noise_out(watch_reruns)

    def _take_noise_out(self, watch_reruns: bool) -> None:
        if self._guards is not None:
            self._computed_at_noise |= self._guards.layer_ran or self._guards.model_ran
            # no layer's hook ran at the noise: compiled code (built before the hooks) may have computed with it
            self._reruns_possible |= self._guards.rerun_possible or (not self._guards.layer_ran and _compiled_anything())
            self._guards.remove()
            self._guards = None
        if self._early is not None:
            self._early.remove()
            self._early = None
        noise_in = self._patches is not None or bool(self._perturbations)
        if watch_reruns and self._reruns_possible and noise_in:
            self._rerun_watch.arm()
        if self._patches is not None:  # virtual mode: nothing was written
            self._patches.remove()
            self._patches = None
            self._perturbations = None
            release(self, self.targets)
            return
        perturbations, self._perturbations = self._perturbations, None
        if not perturbations:
            return
        failed: List[TargetPerturbation] = []
        swapped = [t.name for t in self.targets if t._pinned is not None and t.live_weight() is not t._pinned]
        try:
            with on_device_of(self.targets):
                self._perturber.restore_all(perturbations, failed=failed)  # every layer is attempted before an error is raised
        finally:
            self._unrestored = [p.target.name for p in failed]
            release(self, self.targets)  # after a failure too: this wrapper never perturbs again, and a new one must be able to
            for target in self.targets:
                target._pinned = None
        if swapped:
            raise RuntimeError(
                f"FSDP2 kept {swapped[:3]} unsharded after the backward (set_reshard_after_backward(False)?): Flat-LoRA "
                "restored the shards, but FSDP2's unsharded copies still hold the noise and would be used again. Keep "
                "reshard_after_backward=True (the default) with Flat-LoRA."
            )

    def _check_restored(self) -> None:
        """Refuse to go on after a restore that raised: the layers it names may hold noise, or part of it (a restore
        that stopped halfway cannot be redone: the part it did would be undone twice)."""
        if self._unrestored:
            names = self._unrestored
            raise RuntimeError(
                f"An earlier restore of Flat-LoRA's noise raised for {len(names)} layer(s) ({names[:3]}...): their frozen weights "
                "may still hold noise. Reload those weights (e.g. from a checkpoint) and build a new FlatLoRA; this one will not "
                "perturb them again."
            )

    def _armed(self) -> bool:
        """Inside ``perturbed()`` or between ``perturb()`` and ``restore()``: virtual mode's layers take the noise in
        every forward (outside, only in forwards that build a graph, while one still waits for its backward)."""
        return self._depth > 0 or self._held

    def _clean_weight(self, target: LoRATarget) -> torch.Tensor:
        clean = target.weight.detach().clone()
        with on_device_of([target]):
            for p in self._perturbations or []:
                if p.target is target:
                    self._perturber.restore(p, dest=target.rows_of(clean))
        return clean

    def _on_mode_change(self, mode: bool) -> None:
        self.restore(force=True)
        raise RuntimeError(
            f"model.{'train' if mode else 'eval'}() was called while Flat-LoRA noise is in the base weights (inside "
            "opt.perturbed() or between its forward and backward). The weights have been restored; the pending "
            "gradient cannot be computed. Switch modes outside the block, after backward()."
        )

    def _on_conversion(self) -> None:
        self.restore(force=True)
        raise RuntimeError(
            "The model (or a module holding a perturbed weight) was converted to another dtype, device or memory format "
            "(to(), half(), float(), cuda()...) while Flat-LoRA noise is in the base weights (inside opt.perturbed() or between its forward and backward): the "
            "noise would have gone into the converted weights for good. The weights have been restored and nothing was "
            "converted; convert the model before the block or after the step (and build the optimizer after moving it)."
        )

    # -- optimizer API -------------------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Restore the weights if needed, step the wrapped optimizer, advance ``t``.

        With a ``closure`` (LBFGS, Lightning), every call of it runs at ``W + e`` (the same draw each time, its row stds
        from the adapters of that moment), the noise released when it returns, or earlier by a :meth:`final_backward`
        around its backward (a closure an integration knows computes nothing, Lightning's empty one, runs at ``W``);
        inside a :meth:`perturbed` block as outside one.
        Returns what the wrapped optimizer's ``step`` returns (the closure's loss).
        """
        if closure is None and self._initialises_state():
            return self._inner_step(None, kwargs)  # not a training step: the noise and the schedule are left alone
        computes = closure is not None and (self._closure_computes is None or self._closure_computes(closure))
        keep = computes and self._noise_fits_closure()
        self._held = False
        if self._depth:  # a step inside a block: the block's end, which checks virtual mode's rerouting, comes later
            self._verify_rerouting()
        if not keep:
            self._restore_now()  # the gradient is complete once step() is called
        wrapped = None
        if closure is not None:

            def wrapped() -> Any:  # a closure that reads no weight runs without the noise: it is neither drawn nor restored for it
                with torch.enable_grad(), self._noise_for_closure() if computes else contextlib.nullcontext():
                    return closure()

        skipped = self._skipped_by_grad_scaler()  # decided before the update: nothing may raise after it
        try:
            if computes and self._depth:  # (computes: a closure was given)
                loss = self._closure_step_in_block(wrapped, kwargs)
            else:
                loss = self._inner_step(wrapped, kwargs)
        finally:
            self._rerun_watch.step_ended()
            self._reruns_possible = False
        if not skipped:
            self._step_index += 1
        self._warn_if_no_block(computes)
        if self._depth:
            self._draw_at_next_forward()
        return loss

    def _warn_if_no_block(self, computes: bool) -> None:
        """Warn once when a step comes and no LoRA layer computed at the noise since the last one (no forward inside a
        ``perturbed()`` block or after ``perturb()``, no closure that computes): its gradient was taken at the clean
        weights, plain LoRA's, silently otherwise -- e.g. a loop that calls ``opt.perturbed()`` without ``with``, or
        runs its forward after the block. Inside a block, :class:`_WarnUndrawn` tells instead."""
        computed, self._computed_at_noise = self._computed_at_noise, False
        if computed or computes or self._depth or self._warned_no_block or _compiled_anything():
            return
        self._warned_no_block = True
        warnings.warn(
            "opt.step() came without Flat-LoRA noise in this step: no LoRA layer computed at the noise since the last "
            "step, so the gradient was taken at the clean weights (plain LoRA). Run the forward inside "
            "`with opt.perturbed():` (calling opt.perturbed() without `with` does nothing).",
            RuntimeWarning,
            stacklevel=stacklevel_outside(),
        )

    def _closure_step_in_block(self, closure: Callable[[], Any], kwargs: Dict[str, Any]) -> Any:
        """``step(closure)`` inside a :meth:`perturbed` block: each call of the closure draws and releases its noise as it
        would outside any block (the block's own noise was taken out when the step began), so that every call computes at
        the adapters of its moment and the step ends with clean weights, as a plain ``step()`` in a block does."""
        depth, self._depth = self._depth, 0
        try:
            return self._inner_step(closure, kwargs)
        finally:
            self._depth = depth

    def _inner_step(self, closure: Optional[Callable[[], Any]], kwargs: Dict[str, Any]) -> Any:
        """The wrapped optimizer's ``step`` (with ``closure`` where there is one), known as called from here."""
        key = id(self.base_optimizer)
        nested = key in _STEPPED_BY_A_WRAPPER
        _STEPPED_BY_A_WRAPPER.add(key)
        try:
            return self.base_optimizer.step(**kwargs) if closure is None else self.base_optimizer.step(closure, **kwargs)
        finally:
            if not nested:
                _STEPPED_BY_A_WRAPPER.discard(key)

    def _noise_fits_closure(self) -> bool:
        """Whether :meth:`step` may run its closure at the noise :meth:`perturb` holds instead of restoring it and drawing it
        again: only where an integration said nothing moves the adapters between its ``perturb()`` and the step (the
        Lightning callback in automatic optimization, whose other batches compute at that draw too: its row stds read
        the adapters at ``perturb()``), outside any block, with no graph waiting for its backward."""
        return (self._closure_reuses_held_noise and self._held and self._perturbations is not None and self._depth == 0
                and not (self._guards is not None and self._guards.pending()))

    def _skipped_by_grad_scaler(self) -> bool:
        """Whether GradScaler found inf/NaN gradients and the wrapped (fused) optimizer skips its update: then the
        schedule does not advance, as when GradScaler skips ``step()`` itself for the others (the next step reuses the
        draw). One host sync, in that setting only."""
        found_inf = getattr(self.base_optimizer, "found_inf", None)
        return isinstance(found_inf, torch.Tensor) and bool(found_inf.item())

    def _initialises_state(self) -> bool:
        """``torch.distributed.checkpoint``'s helpers give a fresh optimizer its state with a ``step()`` at learning rate
        0 on zero gradients: no training step (it must neither take the noise out of a block nor advance the schedule).
        A real first step has a non-zero gradient somewhere. Like those helpers, this looks at the parameters that require
        grad only: an optimizer built from all of a model's parameters holds frozen weights too, which get no gradient."""
        if self.base_optimizer.state or not (_every_lr_zero(self.base_optimizer) or _called_by_checkpoint_state_init()):
            return False  # (the cheap tests first: an optimizer without state, such as plain SGD, comes here every step)
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.requires_grad]
        return bool(grads) and all(g is not None for g in grads) and not any(bool(g.any()) for g in grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``state_dict`` plus a ``"flatlora"`` entry (:meth:`flatlora_state_dict`). The hooks
        registered with ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook`` run as on any optimizer."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base_optimizer.state_dict()
        state["flatlora"] = self.flatlora_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            changed = post_hook(self, state)
            if changed is not None:
                state = changed
        return state

    def flatlora_state_dict(self) -> Dict[str, Any]:
        """Flat-LoRA's own state (step, seed, schedule; the settings and target names for the checks on load), without
        the wrapped optimizer's. For checkpoints that carry the optimizer by other means, such as
        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``, which keeps only ``state`` and
        ``param_groups``: save this next to it and give it to :meth:`load_flatlora_state_dict`."""
        return {
            "version": _STATE_VERSION,
            "step": self._step_index,
            "seed": self._perturber.seed,
            "rho": self.schedule.rho,
            "schedule": self.schedule.name,
            "total_steps": self.schedule.total_steps,
            "restore": self._strategy.name,
            "mode": self.mode,
            "rank_noise": self.rank_noise,
            "targets": [t.name for t in self.targets],
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` gave; training then continues bitwise as if uninterrupted.

        Nothing changes when it raises: the ``"flatlora"`` entry is checked before the wrapped optimizer loads. The
        hooks registered with ``register_load_state_dict_pre_hook`` / ``..._post_hook`` run as on any optimizer."""
        self._refuse_inside_block("load_state_dict")
        state_dict = dict(state_dict)  # as torch does: a pre-hook that edits the dict in place leaves the caller's alone
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = pre_hook(self, state_dict)
            if changed is not None:
                state_dict = changed
        state = dict(state_dict)
        flat = state.pop("flatlora", None)
        loaded = None if flat is None else self._checked_flatlora_state(flat)
        previous = self.base_optimizer.state_dict() if self.is_perturbed else None  # (references, no copies)
        self.base_optimizer.load_state_dict(state)  # first: where it raises (another layout of groups), the noise stays in
        try:
            self.restore(force=True)
        except BaseException:  # a restore that fails (a weight written while perturbed): the wrapped optimizer as it was
            if previous is not None:
                self.base_optimizer.load_state_dict(previous)
            raise
        if loaded is None:
            warnings.warn("Loading a state_dict without Flat-LoRA state: the noise schedule restarts at step 0.", stacklevel=2)
            self._step_index = 0
        else:
            self._adopt(*loaded)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def load_flatlora_state_dict(self, flat: Dict[str, Any]) -> None:
        """Load what :meth:`flatlora_state_dict` gave (the wrapped optimizer's state is loaded apart)."""
        self._refuse_inside_block("load_flatlora_state_dict")
        loaded = self._checked_flatlora_state(flat)
        self.restore(force=True)
        self._adopt(*loaded)

    def _refuse_inside_block(self, what: str, advice: str = "Load before entering the block (or after the step).") -> None:
        if self._depth:
            raise RuntimeError(f"{what}() was called inside opt.perturbed(): the block's noise belongs to the step it was drawn for. {advice}")

    def _checked_flatlora_state(self, flat: Dict[str, Any]) -> Tuple[NoiseSchedule, int, int]:
        """``(schedule, seed, step)`` from a saved ``"flatlora"`` entry, or a ``ValueError`` before anything changes. Warns
        where the saved run drew its noise otherwise (other target names, another ``rank_noise``): the run then does
        not continue bitwise."""
        if not isinstance(flat, dict):
            raise ValueError(
                f"The Flat-LoRA state must be the dict flatlora_state_dict() gives (the \"flatlora\" entry of opt.state_dict()), not {type(flat).__name__}."
            )
        if flat.get("version") != _STATE_VERSION:
            raise ValueError(f"Unsupported Flat-LoRA state version {flat.get('version')!r} (this library writes {_STATE_VERSION}).")
        missing = [key for key in ("step", "seed", "rho", "schedule", "total_steps") if key not in flat]
        if missing:
            raise ValueError(f"The Flat-LoRA state lacks {missing}: it is not what flatlora_state_dict() wrote (a truncated or edited checkpoint?).")
        seed, step = (_whole_number_at_least_0(flat, key) for key in ("seed", "step"))
        schedule: ScheduleLike = flat["schedule"]
        if schedule == "callable":
            if isinstance(self.schedule.schedule, str):
                raise ValueError("The checkpoint was trained with a callable schedule; construct FlatLoRA with that callable before loading.")
            schedule = self.schedule.schedule
        loaded = (NoiseSchedule(flat["rho"], schedule, flat["total_steps"]), seed, step)
        self._warn_of_other_settings(loaded[0], seed, flat["schedule"])
        saved = flat.get("targets")
        names = [t.name for t in self.targets]
        if saved is not None and list(saved) != names:
            missing, extra = sorted(set(saved) - set(names)), sorted(set(names) - set(saved))
            warnings.warn(
                f"The Flat-LoRA state was saved with other targets (only in the checkpoint: {missing[:3]}, only here: {extra[:3]}"
                f"{'; same names in another order' if not missing and not extra else ''}). A layer's noise follows from its "
                "name, so the run will not continue as the saved one would have.",
                stacklevel=3,
            )
        if flat.get("rank_noise", self.rank_noise) != self.rank_noise:
            warnings.warn(
                f"The Flat-LoRA state was saved with rank_noise={flat['rank_noise']!r}, this wrapper has {self.rank_noise!r}: under "
                "torch.distributed the ranks now draw other noise than the saved run's.",
                stacklevel=3,
            )
        return loaded

    def _warn_of_other_settings(self, schedule: NoiseSchedule, seed: int, schedule_name: str) -> None:
        """Warn where a loaded state replaces the ``rho``, ``seed``, schedule or ``total_steps`` this wrapper has (the run
        resumes as saved, as torch keeps a checkpoint's learning rates; a user who set new values, a longer run say,
        would not see them used). ``total_steps`` is not compared where an integration sets it after loading."""
        own_name = "callable" if callable(self.schedule.schedule) else self.schedule.schedule
        settings = [("rho", schedule.rho, self.schedule.rho), ("seed", seed, self._perturber.seed), ("schedule", schedule_name, own_name)]
        if not self._length_set_after_loading:
            settings.append(("total_steps", schedule.total_steps, self.schedule.total_steps))
        changed = [f"{what}={new!r} (this FlatLoRA has {own!r})" for what, new, own in settings if new != own]
        if changed:
            warnings.warn(
                f"The loaded Flat-LoRA state sets {', '.join(changed)}: a checkpoint's noise settings are kept, so that the run "
                "continues as it was saved (as torch keeps a checkpoint's learning rates). To go on with other ones, set them "
                "after loading: opt.set_total_steps(T) for the run's length, opt.schedule = NoiseSchedule(rho, schedule, "
                "total_steps) for the rest.",
                stacklevel=4,
            )

    def _adopt(self, schedule: NoiseSchedule, seed: int, step: int) -> None:
        self.schedule = schedule
        self._perturber.seed = seed
        self._step_index = step

    def regenerate_noise(self, name: str) -> torch.Tensor:
        """The full noise matrix of target ``name`` for the current draw (while perturbed).

        Regenerated from its seed, one layer alone; rows are output units (``m x n``).
        """
        for p in self._perturbations or []:
            if p.target.name == name:
                with on_device_of([p.target]):
                    return self._perturber.noise(p)
        known = [t.name for t in self.targets]
        if name not in known:
            raise KeyError(f"{name!r} is not a Flat-LoRA target; targets are {known}.")
        raise RuntimeError("No noise is drawn right now: call regenerate_noise inside opt.perturbed() (sigma_t > 0).")

    def __repr__(self) -> str:
        return (
            f"FlatLoRA({self.base_optimizer.__class__.__name__}, rho={self.schedule.rho}, schedule={self.schedule.name!r}, "
            f"total_steps={self.schedule.total_steps}, seed={self._perturber.seed}, mode={self.mode!r}, restore={self._strategy.name!r}, "
            f"targets={len(self.targets)}, step={self._step_index})"
        )

    def __getstate__(self) -> Dict[str, Any]:
        raise TypeError("FlatLoRA holds the model and private generators and is not picklable; save opt.state_dict() instead.")


MODES = ("inplace", "virtual")


def _called_by_checkpoint_state_init() -> bool:
    """Whether ``torch.distributed.checkpoint``'s state initialisation (``_init_optim_state``) is calling: before torch
    2.4 it steps at the optimizer's own learning rates (from 2.4 at 0, which :func:`_every_lr_zero` tells)."""
    frame = sys._getframe(1)
    for _ in range(16):  # its step() call, the wrapper's step(), the optimizer hooks' wrappers
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_init_optim_state" and code.co_filename.replace("\\", "/").endswith("distributed/checkpoint/state_dict.py"):
            return True
        frame = frame.f_back
    return False


def _whole_number_at_least_0(flat: Dict[str, Any], key: str) -> int:
    """``flat[key]`` as a Python int, or a ``ValueError`` naming it: a saved seed or step count is a whole number >= 0."""
    value = as_int(flat[key])
    if value is None or value < 0:
        raise ValueError(f"The Flat-LoRA state's {key} is {flat[key]!r}: expected a whole number >= 0 (a corrupt or edited checkpoint?).")
    return value


def _compiled_anything() -> bool:
    """Whether torch.compile has built a graph in this process: code it compiled before Flat-LoRA's hooks went in may
    run the layers without calling them, so a step cannot tell that no layer computed at the noise."""
    utils = sys.modules.get("torch._dynamo.utils")
    try:
        return utils is not None and utils.counters["stats"]["unique_graphs"] > 0
    except (AttributeError, KeyError, TypeError):
        return True


def _check_virtual(model: nn.Module, targets: List[LoRATarget]) -> None:
    if type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod"):
        raise ValueError("mode='virtual' does not work with torch.compile'd models; use mode='inplace' (or compile after training).")
    refusals = [why for why in map(virtual_refusal, targets) if why is not None]
    if refusals:
        raise ValueError(f"mode='virtual' cannot reroute {len(refusals)} layer(s): {'; '.join(refusals[:3])}. Use mode='inplace'.")


def check_settings(rho: float, schedule: ScheduleLike = "cosine", total_steps: Optional[int] = None, *, seed: int = 0,
                   restore: str = "exact", mode: str = "inplace", rank_noise: str = "independent") -> Tuple[NoiseSchedule, int]:
    """Check :class:`FlatLoRA`'s settings that need no model, as its constructor does; returns the noise schedule and
    the seed as an int. The integrations call it where the user gives them, so that a wrong value is refused there and
    not when training starts."""
    given_seed, seed_value = seed, as_int(seed)  # (a numpy integer or a one-element integer tensor too, as a Python int)
    if seed_value is None or seed_value < 0:
        raise ValueError(f"Invalid seed {given_seed!r}: expected an int >= 0.")
    if restore not in STRATEGY_NAMES:
        make_strategy(restore)  # raises with the list of choices
    if rank_noise not in ("independent", "shared"):
        raise ValueError(f"Invalid rank_noise={rank_noise!r}: choose 'independent' (a stream per rank) or 'shared' (the same noise on every rank).")
    if mode not in MODES:
        raise ValueError(
            f"Invalid mode={mode!r}: choose 'inplace' (writes W+e into the weights, restores exactly) or 'virtual' (never writes the weights)."
        )
    return NoiseSchedule(rho, schedule, total_steps), seed_value


def _is_accelerate_prepared(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is accelerate's ``AcceleratedOptimizer`` (or a subclass, such as its DeepSpeed wrapper);
    accelerate is not imported here: a process that has not imported it holds none."""
    accelerated = getattr(sys.modules.get("accelerate.optimizer"), "AcceleratedOptimizer", None)
    return isinstance(accelerated, type) and isinstance(optimizer, accelerated)


def _check_optimizer_holds_adapters(optimizer: torch.optim.Optimizer, targets: List[LoRATarget]) -> None:
    """Warn when the wrapped optimizer holds none of the LoRA layers' trainable parameters: the noise would go into the
    weights at every step while nothing Flat-LoRA perturbs for is trained (an optimizer built for another model, or
    for the model before ``get_peft_model``, say)."""
    trainable = {id(p) for t in targets for p in t.module.parameters() if p.requires_grad and p is not t.weight}
    if not trainable:  # adapters held outside the layer modules (or frozen): nothing to compare against
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not held & trainable:
        warnings.warn(
            f"The optimizer wrapped by FlatLoRA holds none of the trainable parameters of the {len(targets)} LoRA layers it "
            f"perturbs (e.g. {targets[0].name!r}): the noise goes into their weights, but their adapters are not trained. "
            "Build the optimizer from the LoRA model's parameters, e.g. [p for p in model.parameters() if p.requires_grad].",
            stacklevel=3,
        )


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is, or holds, a ``torch.compile`` wrapper."""
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _rank() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    return 0


def _check_sharding(targets: List[LoRATarget], mode: str) -> None:
    for t in targets:
        if t.sharded:
            check_row_sharded(t.name, t.weight, t.transposed, mode, [a.B for a in t.adapters()])


def _check_one_device(targets: List[LoRATarget]) -> None:
    if len({t.weight.device for t in targets}) > 1:
        devices = sorted({str(t.weight.device) for t in targets})
        raise ValueError(
            f"The LoRA target weights are spread over several devices ({devices}); FlatLoRA expects the model on one device "
            "(for model parallelism use DDP/FSDP with one device per process)."
        )
