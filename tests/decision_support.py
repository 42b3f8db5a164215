"""Decision events as the service builds them (a judge Decision, its DecisionMessage, a frame)."""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from facedoor.camera import Frame
from facedoor.detect import Face
from facedoor.events import DecisionEvent
from facedoor.judge import Decision
from facedoor.message import EXAMPLE, DecisionMessage


def decision_event(decision: str = "unlock", *, reason: str | None = None, delivered: bool = True,
                   age_s: float = 0.0, ttl_s: float = 5.0, frame: Frame | None = None,
                   faces: Sequence[Face] = (), companions: tuple[int, ...] = (), **fields: Any) -> DecisionEvent:
    """A decision event on FRAME (default: a tiny frame captured AGE_S ago), face 0 deciding."""
    if frame is None:
        frame = Frame(np.zeros((4, 4, 3), np.uint8), 1, time.monotonic() - age_s, time.time() - age_s)
    reason = reason or ("match" if decision == "unlock" else "unknown")
    identity = fields.pop("identity", "alice" if decision == "unlock" else None)
    made = Decision(decision=decision, reason=reason, identity=identity, distance=0.41, threshold=0.7,  # type: ignore[arg-type]
                    frames=3, window=3, faces=max(1, len(faces)), t=frame.t_mono, track=1, face=0,
                    embedding=np.zeros(128, np.float32), unknown_near=len(companions), companions=companions)
    ts_ms = int(frame.t_wall * 1000)
    message = DecisionMessage.model_validate({
        **EXAMPLE, "id": str(uuid.uuid4()), "decision": decision, "reason": reason, "identity": identity,
        "ts_ms": ts_ms, "ttl_s": ttl_s, "expires_at_ms": int((frame.t_wall + ttl_s) * 1000),
        "faces": max(1, len(faces)), "unknown_near": len(companions), **fields})
    return DecisionEvent(made, message, delivered, frame, faces)
