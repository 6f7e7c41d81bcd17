"""Built-in LoRA flavours: this package's ``LoRALinear``, peft, loralib and torchtune.

Importing this package registers them (``flatlora_optim.targets`` does so). None of the LoRA
packages is imported here: a flavour looks for its classes in ``sys.modules`` only, so a model
built with a package has already imported it, and a package that is absent costs nothing.
See ``docs/flavours.md`` for the table of flavours (rows, fan-in, adapters counted).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from . import builtin, loralib_flavours, peft_flavours, torchtune_flavours

BUILTIN_NAMES = frozenset(builtin.NAMES | peft_flavours.NAMES | loralib_flavours.NAMES | torchtune_flavours.NAMES)


def unsupported_kind(module: nn.Module) -> Optional[str]:
    """A label for a LoRA layer no flavour handles (discovery warns and skips it), else ``None``."""
    for finder in (peft_flavours.unsupported_kind, loralib_flavours.unsupported_kind):
        kind = finder(module)
        if kind is not None:
            return kind
    return None


__all__ = ["BUILTIN_NAMES", "unsupported_kind"]
