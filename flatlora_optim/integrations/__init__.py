"""Drop-in integrations of :class:`~flatlora_optim.FlatLoRA` with training frameworks.

Each framework has its own submodule, imported on demand so that ``import flatlora_optim``
never imports a framework:

* :mod:`flatlora_optim.integrations.huggingface` -- transformers ``Trainer`` (and subclasses such
  as TRL's): :func:`~flatlora_optim.integrations.huggingface.add_flatlora` / ``FlatLoRACallback``.
* :mod:`flatlora_optim.integrations.lightning` -- Lightning ``Trainer``: ``FlatLoRACallback``.
* :mod:`flatlora_optim.integrations.accelerate` -- ``accelerator.prepare(model, FlatLoRA(...))``
  helpers (unwrap the prepared optimizer, count the real optimizer steps).

peft needs no integration: a peft model is found by introspection (see ``docs/integrations/peft.md``).
This module itself imports nothing but the framework-free helpers below.
"""

from ._common import find_flatlora, set_total_steps

__all__ = ["find_flatlora", "set_total_steps"]
