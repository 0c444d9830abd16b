"""The non-finite guard: never a silently broken video.

Users of quantized attention report NaN outputs and black frames (FP16 accumulation overflow, extreme V
values). After every scheduled attention call that did not run dense, the guard reads the minimum and maximum of
the output in one reduction (``torch.aminmax``; NaN propagates into both, ±inf shows in one) — no extra
buffer, one host sync per call. A non-finite result is recomputed with dense attention for that call, the event
is counted, and the first one is reported with a warning that names the step, layer and method; later ones are
only counted (``handle.guard_events``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch

__all__ = ["all_finite", "GuardEvent", "Guard", "NonFiniteAttentionWarning"]

logger = logging.getLogger("sagevideo")


class NonFiniteAttentionWarning(RuntimeWarning):
    """An attention call produced NaN/inf and was recomputed dense."""


def all_finite(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is finite (one reduction, no copy of ``t``)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@dataclasses.dataclass(frozen=True)
class GuardEvent:
    """One call whose output was not finite."""

    model: str
    step: int | None
    layer: int
    method: str


class Guard:
    """Counts non-finite outputs of one patch handle and reports the first."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.events: list[GuardEvent] = []
        self._reported = False

    @property
    def count(self) -> int:
        return len(self.events)

    def tripped(self, event: GuardEvent) -> None:
        self.events.append(event)
        if self._reported:
            return
        self._reported = True
        step = "unknown step" if event.step is None else f"step {event.step}"
        warnings.warn(
            f"sagevideo: attention output was not finite ({event.model}, {step}, layer {event.layer}, method "
            f"{event.method}); recomputed that call with dense attention. Further occurrences are counted in "
            "handle.guard_events without another warning.",
            NonFiniteAttentionWarning,
            stacklevel=2,
        )
        logger.warning("sagevideo guard: non-finite attention output recomputed dense: %s", event)
