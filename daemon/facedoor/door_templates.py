"""Door templates: a confident unlock's fused embedding stored as a template of its person (opt-in).

A decision listener (`policy.door_templates` > 0). The judge marks an unlock whose fused distance
is below `policy.door_template_below` as a template; this listener hands it to one worker thread,
so the SQLite write never holds up the frame loop, and the store watcher then reloads the
gallery. At most `door_templates` per person are kept, oldest replaced, enrolment never
(facedoor.store). A write that fails is logged and costs nothing but the template.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facedoor.events import DecisionEvent

log = logging.getLogger(__name__)

QUEUE_SIZE = 16  # unlocks come seconds apart (cooldown); a full queue drops a template, never a frame


class DoorTemplates:
    """Stores delivered template-worthy unlocks in the store at PATH, off the frame thread."""

    def __init__(self, path: Path, encoder_sha256: str, max_per_person: int,
                 on_stored: Callable[[str], object] | None = None):
        self.path = path
        self.on_stored = on_stored  # told each stored person's name (a site roster publishes it)
        self.encoder_sha256 = encoder_sha256
        self.max_per_person = max_per_person
        self.stored = 0
        self._queue: queue.Queue[tuple[str, np.ndarray] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="facedoor-door-templates", daemon=True)
        self._thread.start()

    def on_decision(self, event: DecisionEvent) -> None:
        """Queue a delivered unlock that the judge marked as a template; noted for the audit log."""
        d = event.decision
        if not (event.delivered and d.template and d.identity is not None):
            return
        try:
            self._queue.put_nowait((d.identity, d.embedding))
            event.notes["door_template"] = "queued"
        except queue.Full:
            event.notes["door_template"] = "dropped"
            log.warning("door template for %s dropped (queue full)", d.identity,
                        extra={"fields": {"event": "door_template_dropped", "identity": d.identity}})

    def close(self) -> None:
        """Write what is queued, then stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout=10.0)

    def _run(self) -> None:
        from facedoor.store import EmbeddingStore

        while (item := self._queue.get()) is not None:
            name, embedding = item
            try:
                with EmbeddingStore(self.path, self.encoder_sha256, create=False) as store:
                    store.add_door_template(name, embedding, self.max_per_person)
            except Exception:
                log.exception("door template for %s not stored", name,
                              extra={"fields": {"event": "door_template_failed", "identity": name}})
                continue
            self.stored += 1
            if self.on_stored is not None:
                self.on_stored(name)
            log.info("door template added for %s", name, extra={"fields": {"event": "door_template",
                                                                           "identity": name}})
