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

``BackupRestore`` keeps a full copy (exact, 100% extra memory). ``HostRestore`` keeps that copy in host
memory (see :mod:`flatlora_optim.host_restore`). ``SubtractRestore`` is the
paper's way (no memory, drifts; documented as such).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional

import torch

__all__ = ["noise_dtype", "RestoreStrategy", "ExactRestore", "BackupRestore", "HostRestore", "SubtractRestore", "make_strategy", "STRATEGY_NAMES"]


class _Format(NamedTuple):
    bits: torch.dtype  # same-width integer view
    wide: torch.dtype  # integer type for key differences
    mantissa: int  # explicit mantissa bits
    magnitude: int  # mask of all non-sign bits
    work: torch.dtype  # float type the arithmetic is done in

    @property
    def exponent(self) -> int:
        """Mask of the exponent field."""
        return self.magnitude & ~((1 << self.mantissa) - 1)


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

    Negative floats get their magnitude bits flipped; the map is its own inverse. It commutes
    with sign extension, so it can be applied to bits already widened to ``fmt.wide``.
    """
    return bits ^ ((bits >> (bits.element_size() * 8 - 1)) & fmt.magnitude)


def _wide_keys(bits: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """Ordered keys in ``fmt.wide``, where differences of two keys cannot overflow."""
    return _ordered_key(bits.to(fmt.wide), fmt)


def noise_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The float type noise is drawn and added in for a weight type.

    It must have more precision than the weight: with float32 noise on float32 weights the sum
    ``W + e`` is a rounding tie in about 1 of 30 elements, and ties cannot be undone from
    ``(W~, e)``. 16-bit weights work in float32, float32 and float64 weights in float64.
    """
    return _format(weight_dtype).work


def _candidates(perturbed: torch.Tensor, noise: torch.Tensor, fmt: _Format) -> torch.Tensor:
    return (perturbed.to(fmt.work) - noise).to(perturbed.dtype)


def _flat(block: torch.Tensor) -> torch.Tensor:
    """``block`` in row-major order as one dimension: a view when it is contiguous, else a copy.

    The codec works on flat tensors: one index per element, and no 2-D index arithmetic.
    """
    return block.reshape(-1)


def _ambiguous(perturbed_bits: torch.Tensor, candidate_bits: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """Where ``W~``'s exponent is above ``C``'s: the elements whose low bits the sum may have dropped.

    ``W~``'s exponent field alone is compared with all of ``C``'s magnitude bits: ``C``'s mantissa
    cannot lift it to the next exponent, so no shift is needed. The comparison is the sign of a
    difference of two non-negative integers (no overflow), cast to bool: on CPU faster than ``>``.
    """
    difference = candidate_bits & fmt.magnitude
    difference -= perturbed_bits & fmt.exponent
    return (difference >> (difference.element_size() * 8 - 1)).to(torch.bool)


def _differs(a_bits: torch.Tensor, b_bits: torch.Tensor) -> torch.Tensor:
    # an integer that is non-zero, cast to bool: on CPU about 3x faster than a ``!=`` comparison
    return (a_bits ^ b_bits).to(torch.bool)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions of the ``True`` elements of a 1-D mask (int64).

    On CPU an all-``False`` mask (the usual case for the exceptions) is recognised with a cheap
    byte maximum instead of a ``nonzero`` pass; elsewhere ``nonzero`` is called directly (reading
    the maximum would be one more device synchronisation).
    """
    if mask.device.type == "cpu" and (mask.numel() == 0 or not mask.view(torch.uint8).max()):
        return torch.empty(0, dtype=torch.int64)
    return mask.nonzero().view(-1)


def _join(lost: torch.Tensor, ambiguous: torch.Tensor, misfit: torch.Tensor) -> torch.Tensor:
    """The exception positions: ``lost`` and the ambiguous positions at ``misfit`` (usually none)."""
    if not misfit.numel():
        return lost
    return torch.cat([lost, ambiguous.index_select(0, misfit)])


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
    taken while perturbed). Records are not consumed. A strategy whose ``restore_needs_noise``
    is False is called with ``noise=None`` (the noise is not regenerated for it).
    """

    name = "base"
    exact = True
    restore_needs_noise = True

    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> Any:
        raise NotImplementedError

    def restore(self, dest: torch.Tensor, noise: Optional[torch.Tensor], record: Any) -> None:
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
    """Bitwise-exact restore that stores only the bits the rounding of ``W + e`` dropped.

    Both directions work on the block flattened in row-major order: one ``nonzero`` finds the
    ambiguous elements, and the key arithmetic runs on those few elements only.
    """

    name = "exact"

    @torch.no_grad()
    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> _ExactRecord:
        fmt = _format(block.dtype)
        original = _flat(block).view(fmt.bits)
        written = _flat(perturbed)
        candidate = _candidates(written, _flat(noise), fmt).view(fmt.bits)
        ambiguous = _ambiguous(written.view(fmt.bits), candidate, fmt)
        index = ambiguous.nonzero().view(-1)
        # offset of W from C in representable values, shifted to 0..15 where it fits a nibble
        shifted = _wide_keys(original.index_select(0, index), fmt) - _wide_keys(candidate.index_select(0, index), fmt) - _CODE_MIN
        misfit = _positions((shifted & ~0xF).to(torch.bool))  # outside 0..15
        lost = _positions(_differs(original, candidate) & ~ambiguous)  # C is W elsewhere, but for NaN payloads and overflow
        exceptions = _join(lost, index, misfit)
        exception_index = exceptions.to(torch.int32) if block.numel() < 2**31 else exceptions
        record = _ExactRecord(_pack_nibbles((shifted & 0xF).to(torch.uint8)), index.numel(), exception_index, original.index_select(0, exceptions))
        block.copy_(perturbed)
        return record

    @torch.no_grad()
    def restore(self, dest: torch.Tensor, noise: Optional[torch.Tensor], record: _ExactRecord) -> None:
        assert noise is not None, "exact restore regenerates the candidates from the noise"
        fmt = _format(dest.dtype)
        current = _flat(dest)
        candidate = _candidates(current, _flat(noise), fmt)
        bits = candidate.view(fmt.bits)
        if record.count:
            index = _ambiguous(current.view(fmt.bits), bits, fmt).nonzero().squeeze(1)
            if index.numel() != record.count:
                raise RuntimeError(
                    "Flat-LoRA cannot restore a weight that was modified while perturbed (its rounding pattern changed). "
                    "Frozen base weights must not be written between perturb() and restore()."
                )
            keys = _wide_keys(bits.index_select(0, index), fmt) + (_unpack_nibbles(record.packed, record.count).to(fmt.wide) + _CODE_MIN)
            bits.index_copy_(0, index, _ordered_key(keys, fmt).to(fmt.bits))
        if record.exception_index.numel():
            bits[record.exception_index.long()] = record.exception_bits
        dest.copy_(candidate.view(dest.shape))

    @staticmethod
    def nbytes(record: _ExactRecord) -> int:
        return sum(t.numel() * t.element_size() for t in (record.packed, record.exception_index, record.exception_bits))


class BackupRestore(RestoreStrategy):
    """Keeps a full copy of each block: exact and simple, at 100% extra memory."""

    name = "backup"
    restore_needs_noise = False  # the copy is the answer: no need to regenerate the noise

    @torch.no_grad()
    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        backup = self._copy_of(block)
        block.copy_(perturbed)
        return backup

    @staticmethod
    def _copy_of(block: torch.Tensor) -> torch.Tensor:
        """The copy kept until restore: on the block's own device."""
        return block.clone()

    @torch.no_grad()
    def restore(self, dest: torch.Tensor, noise: Optional[torch.Tensor], record: torch.Tensor) -> None:
        dest.copy_(record)

    @staticmethod
    def nbytes(record: torch.Tensor) -> int:
        return record.numel() * record.element_size()


class HostRestore(BackupRestore):
    """Keeps a copy of each weight in host memory (pinned on CUDA): exact, no device memory.

    On the per-block path (the CPU, float32 weights, a layer outside the fused pass) each step copies the
    block out and back, as :class:`BackupRestore` does, into host memory. On CUDA's fused pass the copies
    are kept from step to step and written back during the backward: :mod:`flatlora_optim.host_restore`.
    """

    name = "host"

    @staticmethod
    def _copy_of(block: torch.Tensor) -> torch.Tensor:
        from .host_restore import _host_like

        copy = _host_like(block)
        copy.copy_(block)
        return copy


class SubtractRestore(RestoreStrategy):
    """The paper's restore, ``W~ - e``: no memory, but NOT exact (weights drift over steps)."""

    name = "subtract"
    exact = False

    @torch.no_grad()
    def perturb(self, block: torch.Tensor, perturbed: torch.Tensor, noise: torch.Tensor) -> None:
        block.copy_(perturbed)
        return None

    @torch.no_grad()
    def restore(self, dest: torch.Tensor, noise: Optional[torch.Tensor], record: Optional[Any]) -> None:
        assert noise is not None, "subtraction needs the regenerated noise"
        dest.copy_(_candidates(dest, noise, _format(dest.dtype)))


STRATEGY_NAMES = ("exact", "backup", "host", "subtract")


def make_strategy(name: str) -> RestoreStrategy:
    """The strategy called ``name`` (``"exact"``, ``"backup"``, ``"host"`` or ``"subtract"``)."""
    strategies = {"exact": ExactRestore, "backup": BackupRestore, "host": HostRestore, "subtract": SubtractRestore}
    if not isinstance(name, str) or name not in strategies:
        raise ValueError(
            f"Invalid restore={name!r}: choose 'exact' (default, bitwise, ~5% memory), 'backup' (bitwise, full copy), "
            "'host' (bitwise, a copy in host memory, restored during the backward) or 'subtract' (the paper's, drifts)."
        )
    return strategies[name]()
