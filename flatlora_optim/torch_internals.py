"""The private or recent torch functions the library reads, each in one place with what it falls back to.

The hooks that call them run for every LoRA layer in every forward and backward: each is looked up once, at import.

The project supports torch >= 2.2; some of these came later or are private (``torch._C``), so each is looked up
once here, and a torch without it gets the stated fallback instead of an ``AttributeError`` in a hook.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["is_compiling", "can_see_autograd_nodes", "current_autograd_node", "graph_task_id", "peek_sequence_nr", "backward_keeps_graph"]

_current_node: Optional[Callable[[], Any]] = getattr(torch._C, "_current_autograd_node", None)
_graph_task_id: Optional[Callable[[], int]] = getattr(torch._C, "_current_graph_task_id", None)

peek_sequence_nr: Optional[Callable[[], int]] = getattr(torch._C._autograd, "_get_sequence_nr", None)
"""The sequence number the next autograd node this thread creates will get (thread-local, increasing); None where
torch lacks it."""

_keeps_graph: Optional[Callable[[], bool]] = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def is_compiling() -> bool:
    """Whether torch.compile is tracing the caller: ``torch.compiler.is_compiling`` (torch >= 2.3), before it
    ``torch._utils.is_compiling`` (torch 2.2, which Dynamo folds as well); False where torch has neither.
    Looked up at each call, not at import: Dynamo, tracing this, then sees the attribute it knows and folds it to True
    (a function object kept from import let virtual mode's refusal under tracing fall back to eager, unraised)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if check is None:
        check = getattr(getattr(torch, "_utils", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def can_see_autograd_nodes() -> bool:
    """Whether :func:`current_autograd_node` can tell (torch has ``torch._C._current_autograd_node``)."""
    return _current_node is not None


def current_autograd_node() -> Any:
    """The autograd node the engine runs on this thread: None outside a backward (and on a torch that cannot tell)."""
    return _current_node() if _current_node is not None else None


def graph_task_id() -> Optional[int]:
    """The id of the backward pass running this call (-1 outside one); None where torch cannot tell."""
    return _graph_task_id() if _graph_task_id is not None else None


def backward_keeps_graph() -> bool:
    """Whether the backward pass running now keeps its graph (``retain_graph=True``, ``create_graph=True``), so that a
    later pass may go through it again; True on a torch that cannot tell."""
    return bool(_keeps_graph()) if _keeps_graph is not None else True
