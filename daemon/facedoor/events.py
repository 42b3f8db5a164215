"""Decisions as events: what the door decided, handed to every listener in order.

The service builds one `DecisionEvent` per decision, after publishing (or dropping) it, and hands
it to its listeners in order: the judge's retraction of an undelivered decision, the unlock
action, door templates, a demo's recorder, the audit log. A listener may add facts to `notes` for
those after it (the unlock action notes whether it drove the relay; the audit log, last, writes
them down). A listener's failure is logged by the service and never reaches the frame loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from facedoor.camera import Frame
    from facedoor.detect import Face
    from facedoor.judge import Decision
    from facedoor.message import DecisionMessage


@dataclass
class DecisionEvent:
    """One decision: the judge's DECISION, the MESSAGE sent for it, whether the broker acknowledged
    it, and its frame with the frame's faces (the deciding one and the unknown ones beside it)."""

    decision: Decision
    message: DecisionMessage
    delivered: bool
    frame: Frame
    faces: Sequence[Face] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def face(self) -> Face | None:
        """The deciding face."""
        return self.faces[self.decision.face] if self.decision.face < len(self.faces) else None

    @property
    def strangers(self) -> tuple[Face, ...]:
        """The faces near the door beside the deciding one that match no member."""
        return tuple(self.faces[i] for i in self.decision.companions if i < len(self.faces))

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
