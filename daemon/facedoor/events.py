"""Decisions as events: what the door decided, handed to every listener in order.

The service builds one `DecisionEvent` per decision, after publishing (or dropping) it, and hands
it to its listeners (unlock action, audit log, a demo's recorder...). A listener may add facts to
`notes` for those after it (the unlock action notes whether it drove the relay; the audit log,
last, writes them down). A listener's failure is logged by the service and never reaches the
frame loop.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from facedoor.camera import Frame
    from facedoor.detect import Face


@dataclass
class DecisionEvent:
    """One decision: the message PAYLOAD, whether the broker acknowledged it, its frame and face."""

    payload: Mapping[str, Any]
    delivered: bool
    frame: Frame
    face: Face | None
    strangers: tuple[Face, ...] = ()  # unknown faces near the door beside the deciding one
    notes: dict[str, Any] = field(default_factory=dict)

    def crop(self, face: Face | None = None) -> Any:
        """FACE's box (default: the deciding face's) cut from the frame (a copy), None without one."""
        face = face if face is not None else self.face
        if face is None:
            return None
        h, w = self.frame.image.shape[:2]
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.box[:4])
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        return self.frame.image[y1:y2, x1:x2].copy() if x2 > x1 and y2 > y1 else None


class DecisionListener(Protocol):
    """Something that acts on decisions (facedoor.unlock, facedoor.audit, the demo's recorder)."""

    def on_decision(self, event: DecisionEvent) -> None: ...
    def close(self) -> None: ...
