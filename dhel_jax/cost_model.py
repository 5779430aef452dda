"""The TPU compiler's cost-model time of a program, with the calls it does not time added back.

``compiled.cost_analysis()["optimal_seconds"]`` of a TPU program counts every ``ConcatBitcast``
custom call (a zero-copy join of a buffer's slices) as exactly -1 s, a sentinel for an operation
the model does not time: whole train steps came out negative, their integer part minus the
number of those calls in ``compiled.as_text()`` (docs/accelerators.md, "Planning a TPU run").
Needs nothing but the standard library, so that ``dhel-compile`` and the accelerator check read
the estimate the same way.
"""

from __future__ import annotations

import re

_UNTIMED_CUSTOM_CALL = re.compile(r'custom_call_target="ConcatBitcast"')


def untimed_custom_calls(hlo_text: str) -> int:
    """How many ``ConcatBitcast`` custom calls a compiled program's HLO text holds."""
    return len(_UNTIMED_CUSTOM_CALL.findall(hlo_text))


def corrected_seconds(optimal_seconds: float, untimed_calls: int) -> float:
    """``optimal_seconds`` with the second the cost model took off for each of
    ``untimed_calls`` (:func:`untimed_custom_calls` of the program's HLO text) added back."""
    return float(optimal_seconds) + untimed_calls
