"""Flat-LoRA in the transformers ``Trainer`` (and subclasses of it, e.g. TRL's ``SFTTrainer``).

One line after building the trainer::

    from flatlora_optim.integrations.huggingface import add_flatlora

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
    add_flatlora(trainer, rho=0.05, seed=0)
    trainer.train()

What happens, per optimizer step of the Trainer's loop (``_run_epoch``):

* ``on_step_begin`` (before the first micro-batch): the model is put in train mode (the Trainer
  would do so in ``training_step`` a moment later; doing it first keeps a mode change from
  hitting perturbed layers after a mid-training evaluation), then ``perturb()`` writes this
  step's noise. Every micro-batch of the accumulation window sees the same draw.
* the last micro-batch's backward (:func:`add_flatlora` wraps the Trainer's ``accelerator.backward``;
  the last micro-batch is the one where ``accelerator.sync_gradients`` is true) runs in
  :meth:`FlatLoRA.final_backward`: with ``restore="host"`` each layer is written back as soon as
  that backward is done with it, its copy to the device running beside the rest of the backward
  (otherwise all layers would be written back at once after it), and the noise is released at
  its end. The gradients are the same: every forward and backward of the step computes at
  ``W + e``. A backward that keeps its graph (``retain_graph=True`` or ``create_graph=True`` passed
  to ``accelerator.backward``) is left alone: a later backward through that graph needs the noise.
  A ``training_step`` that runs more than one forward and backward (chunks of the micro-batch,
  several losses) gets the same draw back before its next forward (``perturb()``, through a
  forward pre-hook on the trained model from ``on_train_begin`` to the end of ``train()``): every forward of the step computes at
  ``W + e``, at the cost of a perturb per extra backward.
* ``on_pre_optimizer_step`` (after the last backward and gradient clipping, before
  ``optimizer.step()``): ``restore()`` again (a no-op when the backward has restored; with a
  :class:`FlatLoRACallback` given directly, without :func:`add_flatlora`, this is where the noise
  comes out). ``FlatLoRA.step`` would restore too; restoring here makes the optimizer update
  start from clean weights whatever wraps the step (a ``GradScaler`` that skips it, for instance).
* ``on_step_end`` / ``on_epoch_end`` / ``on_train_end``: restore again if still perturbed (a
  skipped step), so evaluation, logging and checkpoint saving always see clean weights. If
  ``train()`` is left by an exception (the Trainer has no callback event for it), the wrapper
  that :func:`add_flatlora` puts around ``trainer.train`` restores.
* ``on_train_begin`` (after the optimizer was created, prepared and, on resume, loaded from the
  checkpoint): the schedule length ``T`` is set to ``state.max_steps``, the Trainer's own count of
  optimizer steps (accumulation, epochs, ``max_steps``, world size all included).

Checkpoints: the Trainer saves ``optimizer.state_dict()``, which holds the ``"flatlora"`` entry
(step, seed, schedule); ``resume_from_checkpoint`` loads it back, so the noise stream continues.
Model weights are saved after the step's restore (and ``state_dict()`` is clean even while
perturbed), so no noisy weight reaches the disk.

Not supported: DeepSpeed (it builds and steps its own optimizer), FSDP and other sharded
strategies (the FlatLoRA core expects whole weights on one device per process).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..optimizer import FlatLoRA
from ..schedule import ScheduleLike
from ..targets import TargetsLike
from ._common import check_integration_settings, find_flatlora, restart_schedule, set_total_steps

__all__ = ["FlatLoRACallback", "add_flatlora"]


class FlatLoRACallback(TrainerCallback):
    """Perturb once per optimizer step before the first micro-batch; restore before the update.

    Use :func:`add_flatlora` to install it together with the optimizer wrapping (and the restore
    on an exception leaving ``train()``). It can also be given directly when the Trainer's
    optimizer already is a :class:`FlatLoRA`; then restore after a failed ``train()`` yourself
    (``flat.restore(force=True)``)::

        flat = FlatLoRA(torch.optim.AdamW(lora_params, lr=2e-4), model, rho=0.05, total_steps=1)
        Trainer(..., optimizers=(flat, None), callbacks=[FlatLoRACallback()])

    Args:
        optimizer: the FlatLoRA to drive; found in the Trainer's optimizer at ``on_train_begin``
            when not given.
        sync_total_steps: set the schedule length to the Trainer's ``state.max_steps`` at the
            start of training (the ``total_steps`` given to ``FlatLoRA`` is then only a placeholder).
    """

    def __init__(self, optimizer: Optional[FlatLoRA] = None, *, sync_total_steps: bool = True):
        self.flat = optimizer
        self.sync_total_steps = sync_total_steps
        self._mark_length_set_after_loading(optimizer)
        self.released = False  # final_backward() took this step's noise out before the optimizer step (add_flatlora)
        self._forward_hook: Any = None  # before_forward on the model being trained, from on_train_begin to the end of train()

    def _require(self) -> FlatLoRA:
        if self.flat is None:
            raise RuntimeError(
                "FlatLoRACallback found no FlatLoRA optimizer in the Trainer. Call add_flatlora(trainer, ...) after building "
                "the Trainer, or pass optimizers=(FlatLoRA(...), None) together with the callback."
            )
        return self.flat

    def _mark_length_set_after_loading(self, optimizer: Any) -> None:
        """A FlatLoRA whose length this callback sets at on_train_begin, after the Trainer loaded a checkpoint into it: its
        load does not warn of the checkpoint's other total_steps (its constructor's is a placeholder)."""
        flat = find_flatlora(optimizer)
        if flat is not None and self.sync_total_steps:
            flat._length_set_after_loading = True

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._mark_length_set_after_loading(kwargs.get("optimizer"))  # Trainer(..., optimizers=(FlatLoRA(...), None))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._restore()  # a training loop restarted inside train() (auto_find_batch_size after an out-of-memory step)
        if getattr(args, "deepspeed", None):
            raise RuntimeError("Flat-LoRA does not support DeepSpeed: DeepSpeed builds and steps its own optimizer.")
        found = find_flatlora(kwargs.get("optimizer"))
        if found is not None:
            self.flat = found
        flat = self._require()
        model = kwargs.get("model")  # the model train() runs (a model_init may have replaced the one add_flatlora saw)
        self.remove_forward_hook()
        if model is not None:
            self._forward_hook = model.register_forward_pre_hook(self.before_forward)
        if self.sync_total_steps and state.max_steps > 0:
            set_total_steps(flat, int(state.max_steps))
        if state.global_step > 0 and flat.step_count == 0:
            warnings.warn(
                f"Resuming at global step {state.global_step} but the Flat-LoRA step count is 0: the checkpoint's optimizer "
                "state has no 'flatlora' entry (it was not trained with Flat-LoRA?). The noise schedule restarts at 0.",
                stacklevel=2,
            )
        elif state.global_step == 0 and flat.step_count > 0:
            # train() again without resuming, or auto_find_batch_size's loop run again after an out-of-memory step: the
            # Trainer counts from 0 (and builds anew an LR schedule it made itself); the noise schedule follows its count,
            # as it does step by step (sigma at the Trainer's step t)
            warnings.warn(
                f"The training loop starts at global step 0 while Flat-LoRA is at step {flat.step_count} (an earlier train() "
                "of this Trainer, or auto_find_batch_size starting the loop again): the noise schedule restarts at 0 with the "
                "Trainer's. Pass resume_from_checkpoint to continue a run.",
                stacklevel=2,
            )
            restart_schedule(flat)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.released = False
        flat = self._require()
        model = kwargs.get("model")
        if model is not None and not model.training:
            model.train()  # training_step() does it next; a mode change on perturbed layers would raise
        flat.perturb()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.released = False
        self._require().restore()

    def remove_forward_hook(self) -> None:
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def before_forward(self, module: Any, args: Any) -> None:
        """Forward pre-hook on the model while ``train()`` runs: a forward after the noise was released by a backward of
        the same step (a ``training_step`` with several backward passes) gets the step's draw back first."""
        if self.released:
            self.released = False
            self._require().perturb()

    def is_final_backward(self, accelerator: Any, keeps_graph: bool = False) -> bool:
        """Whether the backward about to run is the step's last one (its last micro-batch: ``accelerator.sync_gradients``)
        with the noise in; not a backward that keeps its graph (``retain_graph=True``, ``create_graph=True``), which
        another backward may go through again."""
        return self.flat is not None and self.flat.is_perturbed and not keeps_graph and bool(getattr(accelerator, "sync_gradients", True))

    def _restore(self) -> None:
        self.released = False
        # Called after the optimizer step (or where it would have been): every backward of the step
        # is done, so nothing can still need the noisy weights -- restore now, even if a graph built
        # at W + e is kept alive somewhere (restore() alone would wait for it to be collected).
        if self.flat is not None and self.flat.is_perturbed:
            self.flat.restore(force=True)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # a micro-batch that is not the window's last: the noise stays for the next one, unless a callback (they run
        # before this one, which add_flatlora appends) stopped the epoch or the run here, mid-window: the Trainer then
        # leaves the loop, and the epoch's end must see the clean weights
        if control.should_epoch_stop or control.should_training_stop:
            self._restore()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._restore()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._restore()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.remove_forward_hook()
        self._restore()


def add_flatlora(
    trainer: Any,
    rho: float = 0.05,
    *,
    schedule: ScheduleLike = "cosine",
    seed: int = 0,
    targets: TargetsLike = None,
    restore: str = "exact",
    **flatlora_kwargs: Any,
) -> FlatLoRACallback:
    """Make ``trainer`` train with Flat-LoRA: wrap its optimizer in :class:`FlatLoRA` and add the callback.

    The optimizer the Trainer creates (or the one passed as ``optimizers=(opt, sched)``) is
    wrapped when the Trainer creates it -- in ``create_optimizer``, before ``accelerator.prepare``
    and before a checkpoint's optimizer state is loaded, so that the ``"flatlora"`` state is saved
    and resumed with it. Works for subclasses that override ``create_optimizer`` (TRL trainers),
    since the wrapping runs after whatever that method builds. The schedule length is the
    Trainer's ``state.max_steps`` (set at ``on_train_begin``). The Trainer's ``accelerator.backward``
    is wrapped too: the last micro-batch's backward runs in :meth:`FlatLoRA.final_backward` (see the
    module docstring).

    Args:
        trainer: a ``transformers.Trainer`` (or subclass) whose model holds the LoRA layers.
        rho, schedule, seed, targets, restore: as in :class:`FlatLoRA`.
        **flatlora_kwargs: any further :class:`FlatLoRA` keyword argument (e.g. ``mode=``) but ``total_steps``,
            which comes from the Trainer.

    Returns:
        The installed :class:`FlatLoRACallback`; its ``flat`` attribute is the FlatLoRA once
        training has started.
    """
    if any(isinstance(cb, FlatLoRACallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("This Trainer already has a FlatLoRACallback; call add_flatlora once.")
    if "total_steps" in flatlora_kwargs:
        raise ValueError("add_flatlora takes total_steps from the Trainer (state.max_steps); set TrainingArguments(max_steps=...) "
                         "or num_train_epochs instead of passing total_steps.")
    check_integration_settings("add_flatlora", rho, schedule, None, seed, restore, flatlora_kwargs)
    callback = FlatLoRACallback()
    create_optimizer = trainer.create_optimizer  # bound method of the (sub)class, or a user override

    def create_flatlora_optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        create_optimizer(*args, **kwargs)
        flat = find_flatlora(trainer.optimizer)
        if flat is None:
            # The real length is known only at on_train_begin; state.max_steps is already set here.
            total = int(getattr(trainer.state, "max_steps", 0) or 0)
            flat = FlatLoRA(
                trainer.optimizer,
                trainer.model,
                rho,
                total_steps=total if total > 0 else 1,
                schedule=schedule,
                seed=seed,
                targets=targets,
                restore=restore,
                **flatlora_kwargs,
            )
            trainer.optimizer = flat
        callback._mark_length_set_after_loading(flat)  # its on_train_begin sets the length, after a checkpoint is loaded
        callback.flat = flat
        return trainer.optimizer

    train = trainer.train

    def train_and_restore(*args: Any, **kwargs: Any) -> Any:
        # The Trainer has no callback event for an exception in the loop: take the noise out here,
        # so that an interrupted train() (error, KeyboardInterrupt) leaves the live weights clean.
        try:
            return train(*args, **kwargs)
        finally:
            callback.remove_forward_hook()
            callback._restore()

    trainer.create_optimizer = create_flatlora_optimizer
    trainer.train = train_and_restore
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and callable(getattr(accelerator, "backward", None)):
        backward = accelerator.backward  # bound method of the Trainer's Accelerator

        def backward_releasing_the_noise(loss: Any, **kwargs: Any) -> Any:
            if not callback.is_final_backward(accelerator, keeps_graph=bool(kwargs.get("retain_graph") or kwargs.get("create_graph"))):
                return backward(loss, **kwargs)
            with callback.flat.final_backward():  # type: ignore[union-attr]
                result = backward(loss, **kwargs)
            callback.released = True  # a later forward of this step gets the noise back (see before_forward)
            return result

        accelerator.backward = backward_releasing_the_noise
    trainer.add_callback(callback)
    return callback
