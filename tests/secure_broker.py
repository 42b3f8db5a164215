"""A private Mosquitto as a door should meet it: TLS only, passwords, per-user ACLs (tests and benchmarks).

`secure_broker(workdir)` generates a CA and a server certificate for 127.0.0.1 with `openssl`, a
password file with `mosquitto_passwd -b` and an ACL file, starts Mosquitto with one TLS listener
on a free loopback port and yields a `SecureBroker`: host, port, CA path and the users with their
passwords and password files. Users:

- `door`: may publish only under `<prefix>/<door_id>/#`, on the relay topic and its Home Assistant
  discovery topic; may read Home Assistant's birth topic.
- `consumer`: may only read (the door's topics, the relay topic, discovery).

`deny=(topic, ...)` takes topics away from `door` (an ACL that forgets the decision or the relay
topic): the broker then answers the door's publishes there with PUBACK 0x87 Not authorized.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
MOSQUITTO_PASSWD = ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd")


class SecureBrokerError(RuntimeError):
    """A tool is missing, certificate generation failed, or Mosquitto did not listen; says which."""


@dataclass(frozen=True)
class SecureBroker:
    """Where the TLS broker listens and who may use it (`passwords[user]`, `password_files[user]`)."""

    host: str
    port: int
    ca: Path
    door_id: str
    topic_prefix: str
    relay_topic: str
    discovery_prefix: str
    passwords: dict[str, str] = field(default_factory=dict)
    password_files: dict[str, Path] = field(default_factory=dict)
    log: Path | None = None


def _tool(name: str, candidates: tuple[str, ...]) -> str:
    found = shutil.which(name) or next((p for p in candidates if Path(p).exists()), None)
    if found is None:
        raise SecureBrokerError(f"{name} not installed (`make test` installs Debian's mosquitto)")
    return found


def _run(*cmd: str, cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SecureBrokerError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr[-1000:]}")


def make_certificates(workdir: Path, name: str = "test") -> tuple[Path, Path, Path]:
    """A fresh CA and a server certificate for 127.0.0.1/localhost signed by it: (ca.crt, server.crt, server.key)."""
    openssl = _tool("openssl", ("/usr/bin/openssl",))
    workdir.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run(openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", f"/CN=facedoor {name} CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=workdir)
    _run(openssl, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=workdir)
    (workdir / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "server.ext", cwd=workdir)
    os.chmod(workdir / "server.key", 0o600)
    return workdir / "ca.crt", workdir / "server.crt", workdir / "server.key"


def _acl(prefix: str, door_id: str, relay_topic: str, discovery: str, deny: Sequence[str] = ()) -> str:
    return (
        "user door\n"
        + "".join(f"topic deny {topic}\n" for topic in deny)
        + f"topic write {prefix}/{door_id}/#\n"
        f"topic write {relay_topic}\n"
        f"topic write {discovery}/device/{door_id}/config\n"
        f"topic read {discovery}/status\n"
        "\n"
        "user consumer\n"
        f"topic read {prefix}/#\n"
        f"topic read {relay_topic}\n"
        f"topic read {discovery}/#\n"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def secure_broker(
    workdir: Path, *, door_id: str = "front", topic_prefix: str = "facedoor",
    relay_topic: str = "zigbee2mqtt/front_door/set", discovery_prefix: str = "homeassistant",
    timeout_s: float = 10.0, deny: Sequence[str] = (),
) -> Iterator[SecureBroker]:
    """Run a TLS + password + ACL Mosquitto in WORKDIR for the duration of the with-block."""
    mosquitto = _tool("mosquitto", MOSQUITTO)
    passwd = _tool("mosquitto_passwd", MOSQUITTO_PASSWD)
    ca, cert, key = make_certificates(workdir / "pki")
    passwords = {user: secrets.token_urlsafe(16) for user in ("door", "consumer")}
    password_file, password_files = workdir / "passwd", {}
    for user, password in passwords.items():
        _run(passwd, *(["-c"] if not password_file.exists() else []), "-b", str(password_file), user, password,
             cwd=workdir)
        secret = workdir / f"{user}.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        password_files[user] = secret
    password_file.chmod(0o600)
    acl = workdir / "acl"
    acl.write_text(_acl(topic_prefix, door_id, relay_topic, discovery_prefix, deny))
    acl.chmod(0o600)
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")  # as root: stay root, read our files
    conf.write_text(
        f"user {user}\nper_listener_settings false\nallow_anonymous false\npersistence false\n"
        f"password_file {password_file}\nacl_file {acl}\n"
        f"listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\ntls_version tlsv1.2\n"
        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
    )
    log = workdir / "mosquitto.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise SecureBrokerError(f"mosquitto exited ({proc.returncode}); see {log}: {log.read_text()[-800:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SecureBrokerError(f"mosquitto did not listen on 127.0.0.1:{port}; see {log}") from None
                time.sleep(0.05)
        yield SecureBroker("127.0.0.1", port, ca, door_id, topic_prefix, relay_topic, discovery_prefix,
                           passwords, password_files, log)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class TlsClient:
    """A paho MQTT v5 client over TLS that records its CONNACK, PUBACKs and messages, for assertions."""

    def __init__(self, broker: SecureBroker, user: str | None, password: str | None, *, ca: Path | None = None):
        self.connected = threading.Event()
        self.done = threading.Event()          # CONNACK received or the connection failed
        self.connack: Any = None
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, Any] = {}
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{secrets.token_hex(3)}",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(ca or broker.ca))
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = lambda *_: self.done.set()
        self.client.on_disconnect = lambda *_: self.done.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *_: self._notify(lambda: self.acks.setdefault(-1, "suback"))
        self.error: Exception | None = None
        try:
            self.client.connect(broker.host, broker.port, keepalive=10)
        except (OSError, ValueError) as exc:  # e.g. ssl.SSLCertVerificationError during the handshake
            self.error = exc
            self.done.set()
            return
        self.client.loop_start()

    def _notify(self, change: Any) -> None:
        with self._cond:
            change()
            self._cond.notify_all()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack = reason
        if not reason.is_failure:
            self.connected.set()
        self.done.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._notify(lambda: self.messages.append((msg.topic, msg.payload)))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._notify(lambda: self.acks.__setitem__(mid, reason))

    def wait(self, check: Any, timeout_s: float = 10.0) -> Any:
        """CHECK() once truthy (waiting on this client's events up to TIMEOUT_S), else its last value."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not (result := check()) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return result

    def subscribe(self, topic: str) -> None:
        """Subscribe to TOPIC (QoS 1) and wait for the SUBACK."""
        self.client.subscribe(topic, qos=1)
        if not self.wait(lambda: self.acks.pop(-1, None)):
            raise AssertionError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes | str) -> Any:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        mid = self.client.publish(topic, payload, qos=1).mid
        if not self.wait(lambda: mid in self.acks):
            raise AssertionError(f"no PUBACK for {topic}")
        return self.acks[mid]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
