"""Flat-LoRA in a Lightning ``Trainer``: one callback.

::

    from flatlora_optim.integrations.lightning import FlatLoRACallback

    trainer = L.Trainer(max_steps=1000, accumulate_grad_batches=4, precision="bf16-mixed",
                        callbacks=[FlatLoRACallback(rho=0.05, seed=0)])
    trainer.fit(lit_module)   # configure_optimizers returns e.g. AdamW over the LoRA parameters

The callback wraps the optimizer that ``configure_optimizers`` returned in :class:`FlatLoRA`
(``on_fit_start``: after the strategy set the optimizer up, before a checkpoint's optimizer state
is restored, so ``ckpt_path=`` resumes the Flat-LoRA step and schedule too). If
``configure_optimizers`` already returns a ``FlatLoRA``, that one is used as it is.

Per training batch (micro-batch):

* ``on_train_batch_start``: ``perturb()``. Within one optimizer step every micro-batch gets the
  same draw (the step count has not advanced), so with ``accumulate_grad_batches=k`` all ``k``
  gradients are taken at the same ``W + e``.
* the optimizer step -- ``FlatLoRA.step`` -- restores the weights exactly before the update.
  With 32-bit and bf16 precision Lightning passes the training closure to ``step``, which runs
  it at the noise ``on_train_batch_start`` put in (not drawn a second time); with 16-bit AMP the
  closure runs before the ``GradScaler`` steps, inside that same perturbation.
* ``on_before_backward`` / ``on_after_backward`` (automatic optimization): the batch's backward runs in
  :meth:`FlatLoRA.final_backward`, which releases the noise when that backward is done. With
  ``restore="host"`` each layer is written back as soon as the backward is done with it, its copy
  running beside the rest of the backward (otherwise all layers would be written back at once after
  it: +17% per step on a 1 B Llama). Other callbacks' and the module's ``on_after_backward`` see
  clean weights once this callback's has run. Manual optimization (``manual_backward`` may run
  several times in one ``training_step``, with forwards in between) and a module that overrides
  ``backward`` (it may backpropagate twice through one graph) keep the noise to the batch's end.
* ``on_train_batch_end``: ``restore()`` (a no-op after a step or a released backward). Between micro-batches the weights
  are clean, so validation, checkpointing or logging that Lightning runs after any batch -- even
  in the middle of an accumulation window -- sees clean weights and can switch the model to eval.
  The price is one extra perturb/restore per micro-batch, small next to a forward/backward.
* ``on_exception`` / ``on_train_epoch_end`` / ``on_train_end``: restore. A module whose ``on_train_batch_start``
  returns -1 (skip the rest of the epoch) skips ``on_train_batch_end`` too: the callback sees that answer (it wraps
  the module's hook while fitting) and restores at once, before any epoch-end hook.

The schedule length of a wrapper the callback creates is ``trainer.estimated_stepping_batches``,
Lightning's own count of optimizer steps (accumulation, ``max_steps``/``max_epochs``,
``limit_train_batches``, devices included). It takes the first epoch's accumulation for every epoch: with a
``GradientAccumulationScheduler`` pass ``total_steps=`` (the callback warns), and under manual optimization,
where Lightning's estimate counts batches, not the optimizer's steps, too (the callback warns).

Not supported: DeepSpeed and FSDP strategies (they own the optimizer and shard the weights),
several optimizers in one LightningModule (wrap the LoRA one yourself and return it).
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Any, ContextManager, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler

from ..optimizer import FlatLoRA
from ..schedule import ScheduleLike
from ..targets import TargetsLike
from ._common import check_integration_settings, find_flatlora, set_total_steps

__all__ = ["FlatLoRACallback"]


class _BatchStartAnswer:
    """The LightningModule's ``on_train_batch_start`` while fitting: an answer of -1 ("skip the rest of the epoch")
    restores the noise the callback put in at once -- Lightning then leaves the epoch without ``on_train_batch_end``,
    and its epoch-end hooks (SWA's averaging, a ``model.eval()``) would see ``W + e``. Holds the callback weakly."""

    __slots__ = ("method", "callback", "previous")

    def __init__(self, method: Any, callback: FlatLoRACallback, previous: Any):
        self.method, self.callback = method, weakref.ref(callback)
        self.previous = previous  # what the module's __dict__ held under the name before (usually nothing)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        answer = self.method(*args, **kwargs)
        callback = self.callback()
        if answer == -1 and callback is not None:
            callback._end_batch()
        return answer

    def __reduce__(self) -> Any:
        # a copy or a pickle of the module during fit (a checkpointing callback's torch.save(pl_module)) gets the
        # module's own hook back, without the callback
        return _unwrapped, (self.method,)


def _unwrapped(method: Any) -> Any:
    return method


def _closure_computes(closure: Any) -> bool:
    """False for the closure Lightning hands the optimizer when a module in manual optimization calls ``opt.step()``
    without one: its ``do_nothing_closure``, which the precision plugin wraps (``partial(_wrap_closure, model,
    optimizer, closure)``) to run the ``on_before_optimizer_step`` hooks and gradient clipping after it. Nothing there
    computes at the weights, so :meth:`FlatLoRA.step` need not draw the noise for it."""
    try:
        from lightning.pytorch.core.optimizer import do_nothing_closure
    except ImportError:  # another Lightning: assume the closure computes
        return True
    return not (isinstance(closure, functools.partial) and closure.args and closure.args[-1] is do_nothing_closure)


def _overrides_backward(pl_module: pl.LightningModule) -> bool:
    """Whether the module replaces ``LightningModule.backward`` (whose own form is one ``loss.backward()``)."""
    return getattr(type(pl_module).backward, "__code__", None) is not pl.LightningModule.backward.__code__


class FlatLoRACallback(Callback):
    """Train a LightningModule's LoRA adapters with Flat-LoRA.

    Args:
        rho, schedule, seed, targets, restore: as in :class:`FlatLoRA`; used when the callback
            wraps the optimizer, ignored when ``configure_optimizers`` returns a ``FlatLoRA``.
        total_steps: the schedule length ``T``; ``None`` (default) takes Lightning's
            ``trainer.estimated_stepping_batches``.
        **flatlora_kwargs: any further :class:`FlatLoRA` keyword argument (e.g. ``mode=``).

    Attributes:
        flat: the :class:`FlatLoRA` in use, once fitting started.
    """

    def __init__(
        self,
        rho: float = 0.05,
        *,
        schedule: ScheduleLike = "cosine",
        seed: int = 0,
        targets: TargetsLike = None,
        restore: str = "exact",
        total_steps: Optional[int] = None,
        **flatlora_kwargs: Any,
    ):
        check_integration_settings("FlatLoRACallback", rho, schedule, total_steps, seed, restore, flatlora_kwargs)
        self.rho = rho
        self.schedule = schedule
        self.seed = seed
        self.targets = targets
        self.restore = restore
        self.total_steps = total_steps
        self.flatlora_kwargs = flatlora_kwargs
        self.flat: Optional[FlatLoRA] = None
        self._owns_wrapper = False
        self._final_backward: Optional[ContextManager[None]] = None  # the batch's backward, between the two hooks
        self._watched: Optional[pl.LightningModule] = None  # the module whose on_train_batch_start is wrapped
        self._warned_accumulation = False
        self._warned_manual = False

    def _schedule_length(self, trainer: pl.Trainer) -> int:
        if self.total_steps is not None:
            return int(self.total_steps)
        if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks) and not self._warned_accumulation:
            self._warned_accumulation = True
            warnings.warn(
                "FlatLoRACallback takes the noise schedule's length from trainer.estimated_stepping_batches, which counts "
                "the first epoch's accumulation for every epoch; with a GradientAccumulationScheduler the run takes another "
                "number of optimizer steps. Pass FlatLoRACallback(total_steps=...).",
                stacklevel=2,
            )
        module = trainer.lightning_module
        if module is not None and not module.automatic_optimization and not self._warned_manual:
            self._warned_manual = True
            warnings.warn(
                "FlatLoRACallback takes the noise schedule's length from trainer.estimated_stepping_batches, which under "
                "manual optimization counts training batches, not the optimizer's steps: where training_step does not step "
                "the optimizer at every batch, the schedule runs longer than training and the noise never reaches rho. Pass "
                "FlatLoRACallback(total_steps=<optimizer steps of the run>).",
                stacklevel=2,
            )
        estimated = trainer.estimated_stepping_batches
        if not isinstance(estimated, (int, float)) or not math.isfinite(estimated) or estimated <= 0:
            raise ValueError(
                f"Lightning cannot tell the number of optimizer steps of this run (estimated_stepping_batches={estimated}); "
                "set max_steps or max_epochs with a sized dataloader, or pass FlatLoRACallback(total_steps=...)."
            )
        return int(estimated)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch_batch_start(pl_module)
        optimizers = list(trainer.strategy.optimizers)
        existing = [f for f in (find_flatlora(o) for o in optimizers) if f is not None]
        if existing:
            if len(existing) > 1:
                raise ValueError("FlatLoRACallback drives one FlatLoRA optimizer; configure_optimizers returned several.")
            self.flat, self._owns_wrapper = existing[0], False
            return
        if len(optimizers) != 1:
            raise ValueError(
                f"FlatLoRACallback wraps exactly one optimizer, but configure_optimizers returned {len(optimizers)}; wrap the one "
                "holding the LoRA parameters in FlatLoRA(...) yourself and return it."
            )
        self.flat = FlatLoRA(
            optimizers[0],
            pl_module,
            self.rho,
            total_steps=self._schedule_length(trainer),
            schedule=self.schedule,
            seed=self.seed,
            targets=self.targets,
            restore=self.restore,
            **self.flatlora_kwargs,
        )
        self._owns_wrapper = True
        self.flat._length_set_after_loading = True  # on_train_start sets it, after a checkpoint's state is loaded
        # LR schedulers keep acting on the wrapped optimizer's param_groups, which FlatLoRA shares.
        trainer.strategy.optimizers = [self.flat]

    def _watch_batch_start(self, pl_module: pl.LightningModule) -> None:
        """Wrap the module's own ``on_train_batch_start`` (see :class:`_BatchStartAnswer`); the base class's never skips."""
        current = vars(pl_module).get("on_train_batch_start")
        if isinstance(current, _BatchStartAnswer):  # left by a fit that ended in a way no hook saw: answer to this callback
            current.callback = weakref.ref(self)
        elif current is not None or type(pl_module).on_train_batch_start is not pl.LightningModule.on_train_batch_start:
            pl_module.on_train_batch_start = _BatchStartAnswer(pl_module.on_train_batch_start, self, current)  # type: ignore[method-assign]
        else:
            return
        self._watched = pl_module

    def _unwatch_batch_start(self) -> None:
        module, self._watched = self._watched, None
        wrapper = vars(module).get("on_train_batch_start") if module is not None else None
        if isinstance(wrapper, _BatchStartAnswer):
            if wrapper.previous is None:
                del module.on_train_batch_start
            else:
                module.on_train_batch_start = wrapper.previous

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwatch_batch_start()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwatch_batch_start()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After restore_training_state: a checkpoint's "flatlora" entry is loaded by now.
        flat = self._require()
        if self._owns_wrapper:
            set_total_steps(flat, self._schedule_length(trainer))
        if trainer.global_step > 0 and flat.step_count == 0:
            warnings.warn(
                f"Fitting from global step {trainer.global_step} but the Flat-LoRA step count is 0: the checkpoint's optimizer "
                "state has no 'flatlora' entry, or this Trainer fitted before and fit() built a new optimizer. The noise "
                "schedule restarts at 0.",
                stacklevel=2,
            )

    def _require(self) -> FlatLoRA:
        if self.flat is None:
            raise RuntimeError("FlatLoRACallback has no optimizer yet: it is set up in on_fit_start (Trainer.fit).")
        return self.flat

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        flat = self._require()
        # automatic optimization: the stepping batch's closure computes at this draw, as every other batch does (in
        # manual optimization the module may step other optimizers, moving adapters, before it steps this one)
        flat._closure_reuses_held_noise = bool(pl_module.automatic_optimization)
        flat._closure_computes = _closure_computes
        flat.perturb()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if not pl_module.automatic_optimization or self.flat is None:
            return  # manual_backward may be followed by another forward of the batch: keep the noise to its end
        if _overrides_backward(pl_module):
            return  # it may backpropagate twice through one graph (retain_graph): the noise stays to the batch's end
        if self._final_backward is not None:  # left open by a backward that raised and was caught: close it, keeping the noise
            self._end_final_backward(RuntimeError("the last backward did not reach on_after_backward"))
        final = self.flat.final_backward()
        final.__enter__()
        self._final_backward = final

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_final_backward(None)

    def _end_final_backward(self, error: Optional[BaseException]) -> None:
        final, self._final_backward = self._final_backward, None
        if final is not None:
            final.__exit__(type(error) if error is not None else None, error, error.__traceback__ if error is not None else None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The batch's backward (automatic or manual optimization) is done; a graph still alive (a
        # training_step that returned None, outputs kept for logging) will not be backpropagated,
        # so restore now instead of waiting for it to be collected.
        self._require()
        self._end_batch()

    def _end_batch(self) -> None:
        """The batch is over: what on_train_batch_start told the wrapper for its step no longer holds, and the noise comes
        out now, even with a graph at W + e still alive (it will not be backpropagated)."""
        flat = self.flat
        if flat is None:
            return
        flat._closure_reuses_held_noise, flat._closure_computes = False, None
        if flat.is_perturbed:
            flat.restore(force=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_batch()  # (a backstop: the batch's end, or the answer -1 of on_train_batch_start, restored already)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_batch()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_final_backward(exception)  # a backward that raised: its block closes without releasing
        self._end_batch()  # the failed batch's graph will never be backpropagated
        self._unwatch_batch_start()  # (neither on_fit_end nor teardown runs after an exception)
