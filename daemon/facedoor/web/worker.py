"""The console's enrolment worker: `facedoor enroll` with the face models kept loaded, in a
child process of its own.

Loading the models (hash checks, ONNX Runtime sessions, layout optimisation) takes seconds and
over a hundred megabytes, so the console never does it in its own process: it starts this worker
when an admin opens a page that can enrol (People, "this is X"), sends it one request per
enrolment, and the worker exits after `IDLE_EXIT_S` without one (or when the console goes). Each
request runs the command line's own `enroll` handler (the same gates, the same one transaction,
the same JSON lines), so the console can never enrol a photo `facedoor enroll` would refuse.

Protocol: one JSON object a line on stdin (`{"argv": [...]}`, the arguments after `--json`),
one on stdout (`{"code": N, "stdout": "...", "stderr": "..."}`); `{"ready": true}` once loaded.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

IDLE_EXIT_S = 300.0
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
WORKER_CODE = "from facedoor.web.worker import main; main()"


def serve(config_argv: list[str]) -> int:
    """The worker's loop (in the child): load the pipeline once, answer requests until idle or EOF."""
    from facedoor.cli import CliContext, CliError, _effective_config, build_parser
    from facedoor.config import ConfigError
    from facedoor.models import ModelError
    from facedoor.store import StoreError

    parser = build_parser()
    try:
        base = parser.parse_args([*config_argv, "list"])
        ctx = CliContext(config=_effective_config(base), json=True)
        ctx.pipeline()
    except Exception as exc:  # said to the console, which shows it; the worker's stderr goes nowhere
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(json.dumps({"ready": True}), flush=True)
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], IDLE_EXIT_S)
        line = sys.stdin.readline() if ready else ""
        if not line:
            return 0  # idle, or the console closed the pipe
        out, err = io.StringIO(), io.StringIO()
        code = 2
        try:
            args = parser.parse_args([*config_argv, "--json", *json.loads(line)["argv"]])
            request = CliContext(config=ctx.config, json=True, _pipeline=ctx._pipeline)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = args.handler(args, request)
                except (CliError, ConfigError, ModelError, StoreError) as exc:
                    print(f"facedoor {args.command}: error: {exc}", file=sys.stderr)
                finally:
                    request.close()
        except (SystemExit, ValueError, KeyError, TypeError) as exc:
            err.write(f"facedoor web worker: bad request ({exc})\n")
        print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)


def main() -> None:
    sys.exit(serve(sys.argv[1:]))


class WorkerError(RuntimeError):
    """The worker could not be started or did not answer in time."""


class EnrolWorker:
    """The console's handle on the worker: started on demand, restarted when it has gone."""

    def __init__(self, config_argv: list[str]):
        self.config_argv = config_argv
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.error: str | None = None

    def warm(self) -> None:
        """Start the worker in the background if it is not running (a page that can enrol was opened)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            self._ready.clear()
            self._proc = subprocess.Popen([sys.executable, "-c", WORKER_CODE, *self.config_argv],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            threading.Thread(target=self._await_ready, args=(self._proc,), daemon=True).start()

    def _await_ready(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            hello = json.loads(proc.stdout.readline() or "{}")
        except ValueError:
            hello = {}
        self.error = None if hello.get("ready") else str(hello.get("error") or "it exited while loading")
        self._ready.set()

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run `facedoor --json ARGV` in the worker: its exit code, stdout and stderr."""
        self.warm()
        with self._lock:
            proc = self._proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            deadline = time.monotonic() + START_TIMEOUT_S
            if not self._ready.wait(max(0.0, deadline - time.monotonic())) or self.error is not None:
                self._kill(proc)
                raise WorkerError(f"the enrolment worker did not start: {self.error or 'timed out'}")
            try:
                proc.stdin.write(json.dumps({"argv": argv}) + "\n")
                proc.stdin.flush()
            except OSError:
                self._kill(proc)
                raise WorkerError("the enrolment worker has gone; try again") from None
            ready, _, _ = select.select([proc.stdout], [], [], REQUEST_TIMEOUT_S)
            line = proc.stdout.readline() if ready else ""
            if not line:
                self._kill(proc)
                raise WorkerError(f"the enrolment worker gave no answer within {REQUEST_TIMEOUT_S:.0f} s "
                                  "(it was stopped; nothing is stored unless it committed)")
            reply: dict[str, Any] = json.loads(line)
            return subprocess.CompletedProcess(argv, int(reply["code"]), reply["stdout"], reply["stderr"])

    def _kill(self, proc: subprocess.Popen[str]) -> None:
        proc.kill()
        proc.wait()
        self._proc = None

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None


def config_argv(config_path: Path | None, models: Path, store: Path) -> list[str]:
    """The global arguments that make the worker use the console's configuration."""
    argv = ["--config", str(config_path)] if config_path is not None else []
    return [*argv, "--models", str(models), "--store", str(store)]

