"""Container healthcheck for taskserve (python:3.11-slim has no curl). Copied into the image as
/app/deploy/healthcheck.py; the Dockerfile's HEALTHCHECK and docker-compose.yml run it.

    python healthcheck.py api     GET http://127.0.0.1:$TASKSERVE_PORT/readyz answers 200
                                  (backbone loaded and store reachable; /healthz only says "process alive")
    python healthcheck.py worker  the registry the worker claims jobs from answers: TASKSERVE_DB_URL, else
                                  the SQLite file in TASKSERVE_STORE (opened read-only, never created here)
    python healthcheck.py         `worker` when PID 1 is `taskserve worker`, else `api` (the image's default,
                                  so a container started with `taskserve worker` is not probed over HTTP)

Exit 0 = healthy, 1 = unhealthy with the reason on stderr. Settings are read the way the server reads them
(`server.settings.Settings`), so an empty TASKSERVE_DB_URL means the SQLite default there too.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0


def check_api() -> str:
    host = os.environ.get("TASKSERVE_HOST", "127.0.0.1").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):  # bound to every interface: ask over loopback
        host = "127.0.0.1"
    port = os.environ.get("TASKSERVE_PORT", "8000").strip() or "8000"
    url = f"http://{host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - fixed local URL
            return f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:  # 503 while the backbone loads or the store is unreachable
        raise SystemExit(f"unhealthy: {url} answered {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"unhealthy: {url}: {exc}") from None


def check_worker() -> str:
    from sqlalchemy import create_engine, text

    from server.settings import Settings

    settings = Settings()
    if settings.db_url:
        url, shown = settings.db_url, settings.db_url.split("@")[-1]  # never print the password
        connect_args = {"connect_timeout": int(TIMEOUT_S)} if url.startswith("postgresql") else {}
    else:
        path = Path(settings.store) / "registry.db"
        if not path.is_file():
            raise SystemExit(f"unhealthy: no registry at {path} yet (the worker creates it once its backbone is loaded)")
        url, connect_args, shown = f"sqlite:///file:{path}?mode=ro&uri=true", {"timeout": TIMEOUT_S}, str(path)
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            queued = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'queued'")).scalar_one()
    except Exception as exc:  # noqa: BLE001 - any failure to read the registry is "unhealthy"
        raise SystemExit(f"unhealthy: registry {shown}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    finally:
        engine.dispose()
    return f"registry {shown}: {queued} queued job(s)"


def pid1_mode() -> str:
    try:
        args = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "api"
    return "worker" if b"worker" in args else "api"


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else pid1_mode()
    if mode not in ("api", "worker"):
        print(f"usage: healthcheck.py [api|worker], got {mode!r}", file=sys.stderr)
        return 2
    print(check_api() if mode == "api" else check_worker())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
