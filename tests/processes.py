"""Start and stop real Celery worker and beat processes for integration tests."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition, timeout, interval=0.1, message="condition"):
    """Poll ``condition`` until it returns a truthy value; raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class CeleryProcess:
    """A ``celery worker`` or ``celery beat`` subprocess with its output in a log file."""

    def __init__(self, kind, env, log_path, extra_args=()):
        self.kind = kind
        self.env = env
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.process = None

    def start(self):
        if self.kind == "worker":
            args = ["worker", "-P", "solo", "-l", "info", "--without-heartbeat", "--without-gossip", "--without-mingle"]
        else:
            args = ["beat", "-l", "info"]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "settings.celery", *args, *self.extra_args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.kind == "worker":
            wait_until(lambda: b"ready." in self.log_path.read_bytes() or self.process.poll() is not None, 30,
                       message="the worker to be ready")
            if self.process.poll() is not None:
                raise RuntimeError(f"celery {self.kind} exited at start:\n{self.log_text()}")
        return self

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def kill(self, sig=signal.SIGKILL):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(10)

    def stop(self):
        """Stop gracefully (SIGTERM), then kill after 10 s. Never raises."""
        try:
            if self.process and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill()
        except (ProcessLookupError, OSError):
            pass
        finally:
            if getattr(self, "_log", None):
                self._log.close()
