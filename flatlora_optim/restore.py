"""Restore strategies: how perturbed weights get back to their exact original bits.

Subtracting the regenerated noise, ``fl(fl(W + e) - e)``, is not ``W``: where ``W + e`` lands in
a coarser binade than ``W`` (``|W + e| > |W|`` across a power of two, or ``|e| >> |W|``) the
rounding of the sum drops low bits of ``W``, and no arithmetic on ``(W + e, e)`` can recover
them. About 5-10% of elements are affected at rho = 0.05-0.15.

``ExactRestore`` (the default) stores exactly those lost bits and nothing else. After writing
``W~ = fl(W + e)`` it forms the candidate ``C = fl(W~ - e)``, which restore can form too (the
noise is regenerated from its seed). Where ``W~``'s exponent is not above ``C``'s, ``C`` is
``W`` (bits can only be lost when the sum moved to a coarser grid). Where it is above -- a
condition restore evaluates identically from ``(W~, e)``, so no index is stored -- it keeps the
distance from ``C`` to ``W`` counted in representable values (their *ordered keys*), a small
integer packed into 4 bits. Anything else (|distance| > 7, ties, overflow to inf, NaN payloads)
goes to a short exception list of (index, original bits). Every record is checked at encode
time by decoding it, so restore is bitwise exact by construction, not by luck.

Memory held per perturbed element: half a byte for each "ambiguous" element (~8-18% of them at
rho 0.05-0.15) plus exceptions -- measured in docs/user-guide.md.

``BackupRestore`` keeps a full copy (exact, 100% extra memory). ``SubtractRestore`` is the
paper's way (no memory, drifts; documented as such).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional

import torch

__all__ = ["noise_dtype", "RestoreStrategy", "ExactRestore", "BackupRestore", "SubtractRestore", "make_strategy", "STRATEGY_NAMES"]


class _Format(NamedTuple):
    bits: torch.dtype  # same-width integer view
    wide: torch.dtype  # integer type for key differences
    mantissa: int  # explicit mantissa bits
    magnitude: int  # mask of all non-sign bits
    work: torch.dtype  # float type the arithmetic is done in


_FORMATS: Dict[torch.dtype, _Format] = {
    torch.float32: _Format(torch.int32, torch.int64, 23, 0x7FFFFFFF, torch.float64),
    torch.bfloat16: _Format(torch.int16, torch.int32, 7, 0x7FFF, torch.float32),
    torch.float16: _Format(torch.int16, torch.int32, 10, 0x7FFF, torch.float32),
    torch.float64: _Format(torch.int64, torch.int64, 52, 0x7FFFFFFFFFFFFFFF, torch.float64),
}

_CODE_MIN, _CODE_MAX = -8, 7  # a signed nibble


def _format(dtype: torch.dtype) -> _Format:
    try:
        return _FORMATS[dtype]
    except KeyError:
        raise ValueError(f"Flat-LoRA perturbs float32, bfloat16, float16 and float64 weights, not {dtype}.") from None


def _ordered_key(bits: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """Map float bit patterns to integers in the order of the float values (-0 just below +0).

    Negative floats get their magnitude bits flipped; the map is its own inverse.
    """
    return bits ^ ((bits >> (bits.element_size() * 8 - 1)) & fmt.magnitude)


def _exponent(bits: torch.Tensor, fmt: _Format) -> torch.Tensor:
    return (bits & fmt.magnitude) >> fmt.mantissa


def noise_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The float type noise is drawn and added in for a weight type.

    It must have more precision than the weight: with float32 noise on float32 weights the sum
    ``W + e`` is a rounding tie in about 1 of 30 elements, and ties cannot be undone from
    ``(W~, e)``. 16-bit weights work in float32, float32 and float64 weights in float64.
    """
    return _format(weight_dtype).work


def _candidates(perturbed: torch.Tensor, noise: torch.Tensor, fmt: _Format) -> torch.Tensor:
    return (perturbed.to(fmt.work) - noise).to(perturbed.dtype)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    codes = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return codes[:count]


class RestoreStrategy:
    """Writes the perturbed values ``W~ = fl(W + noise)`` into a block of rows and later brings back ``W``.

    ``perturb(block, perturbed, noise)`` writes ``perturbed`` into ``block`` and returns a
    record; ``restore(dest, noise, record)`` writes the original values into ``dest``, which must
    hold the perturbed values (the live weight, or a copy of it when a clean ``state_dict`` is
    taken while perturbed). Records are not consumed.
    """

    name = "base"
    exact = True

    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> Any:
        raise NotImplementedError

    def restore(self, dest: torch.Tensor, noise: torch.Tensor, record: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def nbytes(record: Any) -> int:
        """Bytes a record holds between perturb and restore."""
        return 0


@dataclass
class _ExactRecord:
    packed: torch.Tensor  # uint8, two 4-bit key offsets per byte, ambiguous elements in row-major order
    count: int  # number of ambiguous elements
    exception_index: torch.Tensor  # flat row-major index into the block
    exception_bits: torch.Tensor  # original bit patterns there


class ExactRestore(RestoreStrategy):
    """Bitwise-exact restore that stores only the bits the rounding of ``W + e`` dropped."""

    name = "exact"

    @torch.no_grad()
    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> _ExactRecord:
        fmt = _format(block.dtype)
        original_bits = block.view(fmt.bits)
        candidate_bits = _candidates(perturbed, noise, fmt).view(fmt.bits)
        ambiguous = _exponent(perturbed.view(fmt.bits), fmt) > _exponent(candidate_bits, fmt)
        offsets = (_ordered_key(original_bits, fmt).to(fmt.wide) - _ordered_key(candidate_bits, fmt).to(fmt.wide))[ambiguous]
        fits = (offsets >= _CODE_MIN) & (offsets <= _CODE_MAX)
        codes = torch.where(fits, offsets - _CODE_MIN, torch.zeros_like(offsets) - _CODE_MIN).to(torch.uint8)
        exceptions = (original_bits != candidate_bits) & ~ambiguous
        exceptions[ambiguous] = ~fits
        where = exceptions.nonzero()
        index = where[:, 0] * block.shape[1] + where[:, 1]
        if block.numel() < 2**31:
            index = index.to(torch.int32)
        record = _ExactRecord(_pack_nibbles(codes), codes.numel(), index, original_bits[where[:, 0], where[:, 1]].clone())
        block.copy_(perturbed)
        return record

    @torch.no_grad()
    def restore(self, dest: torch.Tensor, noise: torch.Tensor, record: _ExactRecord) -> None:
        fmt = _format(dest.dtype)
        candidate_bits = _candidates(dest, noise, fmt).view(fmt.bits)
        ambiguous = _exponent(dest.view(fmt.bits), fmt) > _exponent(candidate_bits, fmt)
        keys = _ordered_key(candidate_bits, fmt)
        if record.count:
            wide = keys.to(fmt.wide)
            selected = wide[ambiguous]
            if selected.numel() != record.count:
                raise RuntimeError(
                    "Flat-LoRA cannot restore a weight that was modified while perturbed (its rounding pattern changed). "
                    "Frozen base weights must not be written between perturb() and restore()."
                )
            wide[ambiguous] = selected + (_unpack_nibbles(record.packed, record.count).to(fmt.wide) + _CODE_MIN)
            keys = wide.to(fmt.bits)
        restored = _ordered_key(keys, fmt).contiguous()
        if record.exception_index.numel():
            restored.view(-1)[record.exception_index.long()] = record.exception_bits
        dest.copy_(restored.view(dest.dtype))

    @staticmethod
    def nbytes(record: _ExactRecord) -> int:
        return sum(t.numel() * t.element_size() for t in (record.packed, record.exception_index, record.exception_bits))


class BackupRestore(RestoreStrategy):
    """Keeps a full copy of each block: exact and simple, at 100% extra memory."""

    name = "backup"

    @torch.no_grad()
    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        backup = block.clone()
        block.copy_(perturbed)
        return backup

    @torch.no_grad()
    def restore(self, dest: torch.Tensor, noise: torch.Tensor, record: torch.Tensor) -> None:
        dest.copy_(record)

    @staticmethod
    def nbytes(record: torch.Tensor) -> int:
        return record.numel() * record.element_size()


class SubtractRestore(RestoreStrategy):
    """The paper's restore, ``W~ - e``: no memory, but NOT exact (weights drift over steps)."""

    name = "subtract"
    exact = False

    @torch.no_grad()
    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> None:
        block.copy_(perturbed)
        return None

    @torch.no_grad()
    def restore(self, dest: torch.Tensor, noise: torch.Tensor, record: Optional[Any]) -> None:
        dest.copy_(_candidates(dest, noise, _format(dest.dtype)))


STRATEGY_NAMES = ("exact", "backup", "subtract")


def make_strategy(name: str) -> RestoreStrategy:
    """The strategy called ``name`` (``"exact"``, ``"backup"`` or ``"subtract"``)."""
    strategies = {"exact": ExactRestore, "backup": BackupRestore, "subtract": SubtractRestore}
    if name not in strategies:
        raise ValueError(
            f"Invalid restore={name!r}: choose 'exact' (default, bitwise, ~5% memory), 'backup' (bitwise, full copy) "
            "or 'subtract' (the paper's, drifts)."
        )
    return strategies[name]()
