"""The embedded training worker: `taskserve serve` starts `taskserve worker` as a child process
(its own engine, so training never stalls serving), restarts it if it dies, and stops it on
shutdown. The child gets the server's settings through TASKSERVE_* variables."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys

from server.settings import Settings

log = logging.getLogger("taskserve.api")


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as the environment variables that reproduce them."""
    env = {}
    for name, value in settings.model_dump().items():
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        env[f"TASKSERVE_{name.upper()}"] = text  # "" reads back as unset
    return env


class WorkerProcess:
    def __init__(self, settings: Settings) -> None:
        self.env = {**os.environ, **settings_env(settings), "TASKSERVE_EMBEDDED_WORKER": "false"}
        self.process: subprocess.Popen | None = None
        self._watch: asyncio.Task | None = None

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=self.env)

    def start(self) -> None:
        self.process = self._spawn()
        log.info("embedded worker started (pid %d)", self.process.pid)
        self._watch = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.process is not None and self.process.poll() is not None:
                log.error("embedded worker exited with %s; restarting in 5 s", self.process.returncode)
                await asyncio.sleep(5.0)
                self.process = self._spawn()

    async def stop(self, timeout: float = 15.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.process.wait, 5)
