"""The objects Flat-LoRA puts on a model while its noise is in refuse to be copied or pickled, with a clear message.

Hooks, guarded methods and rerouted forwards hold the wrapper and the step's perturbation. A
``copy.deepcopy(model)`` or ``torch.save(model)`` inside the block (an EMA or teacher copy, say) would
otherwise fail deep inside with an error about the optimizer or a weak reference, or -- for a rerouted
forward, a plain function that ``deepcopy`` shares -- give a copy that computes with the original's weights.
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["Uncopyable", "COPY_REFUSED"]

COPY_REFUSED = (
    "The model carries Flat-LoRA's hooks while its noise is in (inside opt.perturbed(), or between its forward and "
    "backward), so it cannot be copied or pickled now (copy.deepcopy, torch.save(model), pickle): in-place mode's "
    "weights hold the noise. Copy or save the model before the block or after opt.step(); model.state_dict() is clean "
    "at any time."
)


class Uncopyable:
    """Mixin: ``copy.deepcopy`` and ``pickle`` raise ``TypeError(COPY_REFUSED)`` (both go through ``__reduce_ex__``)."""

    __slots__ = ()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError(COPY_REFUSED)
