"""What discovery found, as rows and as a table: ``describe_targets`` and ``format_targets``.

One row per target: module name, flavour, stored weight shape and dtype, the row view
(``m`` rows x fan-in ``n``, and how it is taken from the stored weight), the adapters counted
right now (names, with the LoRA variant when there is one) and the bytes the noise is written
into. ``FlatLoRA.describe()`` and the construction-time log use these.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .targets import LoRATarget

__all__ = ["describe_targets", "format_targets"]


def _adapter_labels(target: LoRATarget) -> List[str]:
    labels = []
    try:
        adapters = target.adapters()
    except Exception as exc:  # a layer in a state that cannot be perturbed (merged...): say so
        return [f"<{type(exc).__name__}>"]
    module = target.module
    for adapter in adapters:
        label = adapter.name
        if target.flavour.startswith("peft"):
            from .flavours.peft_flavours import variant_label

            variant = variant_label(module, adapter.name)
            if variant is not None:
                label += f" ({variant})"
        elif target.flavour == "torchtune-dora":
            label += " (DoRA)"
        labels.append(label)
    return labels


def describe_targets(targets: Sequence[LoRATarget]) -> List[Dict[str, Any]]:
    """One dict per target: ``name``, ``flavour``, ``weight_shape``, ``dtype``, ``rows`` (m), ``fan_in`` (n),
    ``view`` (``"rows"``, ``"transposed"`` or ``"flattened"``), ``adapters`` (names counted now) and
    ``bytes`` (bytes of the weight the noise is written into)."""
    out = []
    for target in targets:
        weight = target.weight
        m, n = target.shape
        view = "transposed" if target.transposed else ("flattened" if weight.dim() > 2 else "rows")
        out.append(
            {
                "name": target.name,
                "flavour": target.flavour,
                "weight_shape": tuple(weight.shape),
                "dtype": str(weight.dtype).replace("torch.", ""),
                "rows": m,
                "fan_in": n,
                "view": view,
                "adapters": _adapter_labels(target),
                "bytes": weight.numel() * weight.element_size(),
            }
        )
    return out


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"  # pragma: no cover


def format_targets(targets: Sequence[LoRATarget]) -> str:
    """A plain-text table of :func:`describe_targets`, with a total line (for logs and ``print``)."""
    rows = describe_targets(targets)
    header = ["module", "flavour", "weight", "dtype", "rows x fan-in", "adapters", "bytes"]
    table = [
        [
            r["name"],
            r["flavour"],
            "x".join(str(s) for s in r["weight_shape"]) + ("" if r["view"] == "rows" else f" ({r['view']})"),
            r["dtype"],
            f"{r['rows']} x {r['fan_in']}",
            ", ".join(r["adapters"]) or "-",
            _human(r["bytes"]),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{len(rows)} target(s), {_human(total)} perturbed")
    return "\n".join(lines)
