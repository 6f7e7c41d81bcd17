"""What a step reads from the LoRA layers, kept from one step to the next while none of them changed.

Before its first launch, every in-place step reads each target's weight and row view, checks it (merged adapters,
dtype, layout), reads its adapters, decides which layers take the step-wide pass and builds the step's tables from
all that: about 25 us per layer on the H200 machine's host, 3 ms for the 1 B Llama's 112 layers. In a loop that
synchronises every step (``loss.item()`` for a log line) the GPU waits for all of it (docs/benchmarks.md, seventeenth
session). In a training run the answers are the same at every step: the optimizer moves the adapters' values, not
their storage. :class:`SteadyReads` compares each target's state key (:meth:`LoRATarget.state_key`: identities,
layouts and flags, a few microseconds) with the last step's, and while every key is the same hands out what was
read then. Any difference (an adapter switched, merged or disabled, a parameter replaced or its ``.data`` swapped, a
new scaling) forgets everything, and the step reads and checks anew. A target without a key (a flavour that has
none, a parametrised or FSDP2-sharded weight) makes every step read anew.

Only the step's own path uses it (``FlatLoRA._apply_noise`` and what it calls with it), right after
:meth:`SteadyReads.unchanged` compared the keys of that step.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

__all__ = ["SteadyReads"]


class SteadyReads:
    """The last step's reads of a list of targets, with the state keys they were read under."""

    def __init__(self) -> None:
        self._targets: List[Any] = []  # held: compared by identity with the next step's
        self._keys: Optional[List[tuple]] = None  # the keys of the last step whose checks passed
        self._pending: Optional[List[tuple]] = None  # this step's keys, until confirm()
        self._kept: Dict[str, Any] = {}

    def unchanged(self, targets: Sequence[Any]) -> bool:
        """Whether every target's state key is the last confirmed step's. If not, everything kept is dropped and
        this step's keys wait for :meth:`confirm` (called once the step's checks passed)."""
        keys = [target.state_key() for target in targets]
        if (self._keys is not None and len(targets) == len(self._targets) and all(a is b for a, b in zip(targets, self._targets))
                and keys == self._keys):
            return True
        self.forget()
        if all(key is not None for key in keys):
            self._targets, self._pending = list(targets), keys
        return False

    def confirm(self) -> None:
        """This step's checks passed: what is read from now on is kept under its keys."""
        self._keys, self._pending = self._pending, None

    def forget(self) -> None:
        self._targets, self._keys, self._pending = [], None, None
        self._kept.clear()

    def get(self, name: str) -> Any:
        """What was kept under ``name`` (None if nothing, or if the keys are not confirmed)."""
        return self._kept.get(name) if self._keys is not None else None

    def keep(self, name: str, value: Any) -> None:
        """Keep ``value`` under ``name`` while the keys stay the same (only once they are confirmed)."""
        if self._keys is not None:
            self._kept[name] = value
