"""A private Mosquitto broker on a free loopback port, and a recording subscriber (demo, tests,
benchmarks; never production).

The door itself talks to the building's broker; this only starts Debian's `mosquitto` binary for
runs that must be self-contained. `stop()` and `start()` keep the same port, so callers can
simulate a broker outage and its return.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """Mosquitto exited or did not listen in time; the message points at its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    return shutil.which("mosquitto") or next((p for p in CANDIDATES if Path(p).exists()), None)


class PrivateBroker:
    """Mosquitto listening on 127.0.0.1:<free port>, anonymous, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = ""):
        self.binary = mosquitto_binary()
        self.extra_conf = extra_conf  # more mosquitto.conf lines, e.g. a bridge
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def available(self) -> bool:
        return self.binary is not None

    def start(self, timeout_s: float = 10.0) -> bool:
        """Start (no-op if running); False when mosquitto is not installed, BrokerError on failure."""
        if self.binary is None:
            return False
        if self.proc is not None:
            return True
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\n" + self.extra_conf)
        with open(self.log, "ab") as log_file:
            self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log_file, stderr=log_file)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port}; see {self.log}")

    def pause(self) -> None:
        """Stall the broker: its process stops (SIGSTOP) while its TCP connections stay up."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker go on (SIGCONT): it then handles everything sent to it meanwhile."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Terminate the broker (killed after 5 s); the port stays reserved for start()."""
        if self.proc is None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Subscriber:
    """Records every message on TOPICS (receive time, retain flag, expiry, QoS); re-subscribes after reconnects.

    Unless WAIT is false (a broker that is down yet), returns once the broker has acknowledged the
    subscription (at once without TOPICS, for a publish-only client), so nothing published afterwards
    is missed. retainAsPublished: a retained message keeps its flag even when it arrives live.
    """

    def __init__(self, host: str, port: int, *topics: str, wait: bool = True, tls_ca: Path | None = None,
                 username: str | None = None, password: str | None = None):
        self.topics = topics
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.subscribed = threading.Event()  # set on SUBACK, cleared on disconnect
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # floats work
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, *_: (c.subscribe([(t, options) for t in topics]) if topics
                                                else self.subscribed.set())
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_disconnect = lambda *_: self.subscribed.clear()
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        if wait and not self.subscribed.wait(10):
            self.stop()
            raise AssertionError(f"test subscriber did not subscribe to {topics} on {host}:{port}")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        expiry = getattr(msg.properties, "MessageExpiryInterval", None) if msg.properties else None
        record = {"recv": time.time(), "topic": msg.topic, "payload": msg.payload.decode(errors="replace"),
                  "raw": bytes(msg.payload),
                  "retain": bool(msg.retain), "expiry": expiry, "qos": msg.qos}
        with self._cond:
            self.messages.append(record)
            self._cond.notify_all()

    def _wait(self, check: Callable[[list[dict[str, Any]]], Any], timeout: float) -> Any:
        """CHECK's result on the messages so far, as soon as it is truthy or when TIMEOUT runs out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (result := check(self.messages)) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return result

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The first recorded message satisfying PREDICATE, waiting up to TIMEOUT seconds."""
        return self._wait(lambda ms: next((m for m in ms if predicate(m)), None), timeout)

    def wait_count(self, topic: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The messages on TOPIC once there are COUNT of them (fewer if TIMEOUT runs out first)."""
        self._wait(lambda ms: sum(m["topic"] == topic for m in ms) >= count, timeout)
        return self.on(topic)

    def on(self, topic: str) -> list[dict[str, Any]]:
        """The messages on TOPIC, given in full or by its last levels (`decision`)."""
        with self._cond:
            return [m for m in self.messages if m["topic"] == topic or m["topic"].endswith("/" + topic)]

    def decisions(self) -> list[dict[str, Any]]:
        """Decision payloads (parsed) with the transport facts under `_recv`, `_retain`, `_expiry`."""
        return [{**json.loads(m["payload"]), "_recv": m["recv"], "_retain": m["retain"], "_expiry": m["expiry"]}
                for m in self.on("decision")]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(host: str, port: int, topic: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The retained message on TOPIC as a fresh subscriber sees it (None if there is none)."""
    sub = Subscriber(host, port, topic)
    try:
        return sub.wait_for(lambda m: m["retain"], timeout)
    finally:
        sub.stop()
