"""Drills 4 and 5: the OpenAPI schema fuzzed against a real server; hostile task names and links in the store.

Drill 4 (fuzz). schemathesis reads the served `/openapi.json` and generates requests for every route
(positive and negative data through its examples, coverage and fuzzing phases, then its stateful phase,
which chains operations through the links it infers), with the API key so the admin routes run too,
against a `taskserve serve` process of its own (tasks of all five methods published; deleting them is
fine there). No answer is a server error (>= 500), every 4xx carries the error contract's body, and
/readyz answers 200 afterwards. A second measurement sends only *positive* cases (bodies the schema says
are valid) to `POST /v1/predict` and `POST /v1/tasks` and counts what the server still refuses, and why:
a rule the schema states is never the reason (what remains is state — unknown or taken names — and the
method-specific rules of a task's `init` / `examples`).

Drill 5 (hostile). Traversal-looking, look-alike, overlong and NUL-carrying names in every route that
takes a task name (path and body, percent-encoded and raw) answer 404 / 422 and open no file outside the
store (the server is traced with strace where it exists); a task whose artifact folder, parent folder or
file is a link out of the store is refused — marked failed with the reason, not served — without a read
through the link; the store's own name check refuses a trailing newline.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import hypothesis
import pytest
import schemathesis
import torch
from harness import FULL, Deployment, deployment, record, scale
from serving import wait
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from schemathesis import GenerationMode

from adapters_store import codec
from helpers import CLASSIFY
from server.errors import InvalidRequest
from server.task import check_task_name

ROUTES_WITH_A_BODY = ("POST /v1/predict", "POST /v1/tasks")

# ---- drill 4: fuzzing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Iterator[Deployment]:
    """The fuzzer's own server: jobs are queued, never trained (no embedded worker), so a generated
    training request costs a registry row, not minutes of CPU."""
    with deployment(tmp_path_factory.mktemp("fuzz"), TASKSERVE_EMBEDDED_WORKER="false") as d:
        d.publish(per_method=1)
        yield d


def served_schema(d: Deployment):
    """The deployment's OpenAPI schema as schemathesis reads it, sending the deployment's key (no
    made-up credentials for the security schemes)."""
    schema = schemathesis.openapi.from_url(f"{d.url}/openapi.json")
    schema.config.update(base_url=d.url, headers=d.headers, request_timeout=60)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], with_security_parameters=False)
    return schema


NAMED = {"POST /v1/predict": "task", "POST /v1/completions": "model", "POST /v1/chat/completions": "model"}
"""The routes whose body names the task to run, and the field that does."""


@pytest.fixture(scope="module")
def api_schema(fuzzed: Deployment):
    schema = served_schema(fuzzed)
    if not FULL:  # `make test`: the fuzzing and stateful phases, the same cases each run; `make drills`: all phases, new cases
        schema.config.seed = 4
        schema.config.phases.coverage.enabled = False

    @schema.hook
    def flatmap_body(context, body):
        """Half the generated bodies of the routes in NAMED name a served task, so that the fuzzed texts
        and options reach the engine instead of stopping at a 404 (a random name is never a task)."""
        field = NAMED.get(context.operation.label) if context.operation is not None else None
        if field is None or not isinstance(body, dict):
            return st.just(body)

        def aim(name: str) -> dict:
            aimed = {**body, field: name} if field in body or "inputs" not in body else dict(body)
            if isinstance(aimed.get("inputs"), list):
                aimed["inputs"] = [{**row, "task": name} if isinstance(row, dict) else row for row in aimed["inputs"]]
            return aimed

        return st.just(body) | st.sampled_from(fuzzed.tasks[-5:]).map(aim)  # the last five published

    return schema


RULES_THE_SCHEMA_STATES = (  # the reasons a positive case was refused before the schema said so
    r"this endpoint needs the API key",  # the key as header parameters, not a security scheme: generated at random
    r"give either task \+ text or inputs", r"task and text go together",  # predict: one row or `inputs`
    r"template: must contain the \{text\} placeholder", r"labels: labels must be non-empty",
    r"name: .* must match", r"echo: ", r"stop: Value should have at most",
    r"max_new_tokens: must be in",  # the engine's bound (256) under the schema's 1024
)


def _reason(response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    return re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\d+", "…", message)[:90]


def test_positive_cases_are_refused_only_for_rules_the_schema_cannot_state(fuzzed: Deployment) -> None:
    """Bodies generated from the schema as valid, sent to the two routes that take one (a predict row's
    task set to a served one in turn, as a client would name it; a new task's name left as generated):
    every refusal is counted by status and reason; a 4xx for a rule the schema states fails the drill."""
    api_schema = served_schema(fuzzed)
    per_route = scale(60, 400)
    served = [n for n in fuzzed.tasks if httpx.get(f"{fuzzed.url}/v1/tasks/{n}", timeout=10).json().get("served")]
    served = served or fuzzed.publish(per_method=1, prefix="positive")  # run after the fuzzer deleted them
    turn = iter(range(10**9))
    figures: dict[str, dict] = {}
    stated = []
    for label in ROUTES_WITH_A_BODY:
        method, path = label.split()
        operation = api_schema[path][method]
        statuses, reasons = collections.Counter(), collections.Counter()

        @settings(max_examples=per_route, deadline=None, database=None, derandomize=True, phases=[hypothesis.Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @hypothesis.given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        def send(case) -> None:
            body = case.body
            if label == "POST /v1/predict" and isinstance(body, dict):  # still valid: a task name is any 1-64 characters
                for row in [body, *(body.get("inputs") or [])]:
                    if isinstance(row, dict) and isinstance(row.get("task"), str):
                        row["task"] = served[next(turn) % len(served)]
            response = case.call(headers=fuzzed.headers, timeout=60)  # a client holding the key
            statuses[response.status_code] += 1
            if 400 <= response.status_code < 500:
                reason = _reason(response)
                reasons[f"{response.status_code} {reason}"] += 1
                if any(re.search(rule, reason) for rule in RULES_THE_SCHEMA_STATES):
                    stated.append((label, case.body, response.status_code, reason))

        send()
        sent = sum(statuses.values())
        refused = sum(n for s, n in statuses.items() if 400 <= s < 500)
        by_rules = sum(n for s, n in statuses.items() if s in (401, 413, 422))  # 404 / 409 / 429: the server's state
        figures[label] = {"sent": sent, "refused_4xx": refused, "refused_by_rules": by_rules, "ratio_4xx": round(refused / sent, 3),
                          "ratio_rules": round(by_rules / sent, 3), "statuses": dict(sorted(statuses.items())), "reasons": dict(reasons.most_common(8))}
        print(label, json.dumps({**figures[label], "reasons": dict(reasons.most_common())}, indent=1, ensure_ascii=False))
    record("fuzz-positive", **{label.replace(" ", "_"): f for label, f in figures.items()}, refused_for_stated_rules=len(stated))
    assert not stated, f"{len(stated)} positive cases refused for a rule the schema states, e.g. {stated[:3]}"


lazy_schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def node_id_for_schemathesis(request) -> None:
    """schemathesis 4.32's lazy `parametrize` renames the test node through `Node._nodeid`, which pytest
    9.2 no longer has (the id lives in `Node._id`): give the node the attribute it reads and writes."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
"""phase/mode -> operation -> cases sent, over both fuzzing tests (read by the stateful one's record)."""
SECONDS: collections.Counter = collections.Counter()
STATUSES: collections.Counter = collections.Counter()
ANSWERED: collections.Counter = collections.Counter()
"""operation -> 2xx answers (a case that reached the work behind the route, not only its validation)."""


def _check(case, response) -> str | None:
    """What is wrong with an answer (None: nothing): a server error, or a 4xx without the error body."""
    status = response.status_code
    if status >= 500:
        return f"server error {status}: {response.text[:300]}"
    if status >= 400:
        try:
            error = response.json()["error"]
            assert isinstance(error["type"], str) and isinstance(error["message"], str)
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"{status} without the error body: {response.text[:300]}"
    return None


@settings(max_examples=scale(12, 120), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@lazy_schema.parametrize()
@pytest.mark.usefixtures("node_id_for_schemathesis")
def test_fuzz_every_route_answers_no_server_error(case) -> None:
    start = time.perf_counter()
    response = case.call(timeout=60)
    SECONDS[case.operation.label] += time.perf_counter() - start
    TALLY[f"{case.meta.phase.name.value}/{case.meta.generation.mode.value}"][case.operation.label] += 1
    STATUSES[response.status_code] += 1
    ANSWERED[case.operation.label] += response.status_code < 300
    problem = _check(case, response)
    assert problem is None, f"{case.as_curl_command()}\n-> {problem}"


def test_stateful_phase_answers_no_server_error_and_the_server_stays_ready(api_schema, fuzzed: Deployment) -> None:
    """Scenarios chaining the operations through the links schemathesis infers (a created task's name
    into GET / DELETE /v1/tasks/{name}, a job's id into /v1/jobs/{id}, ...), run in suites until the
    step budget is spent: a replay that the server's changed state makes draw differently (hypothesis'
    Flaky) ends a suite without failing it, as in schemathesis' own runner; a bad answer fails the drill."""
    if not all(httpx.get(f"{fuzzed.url}/v1/tasks/{n}", timeout=10).json().get("served") for n in fuzzed.tasks[-5:]):
        fuzzed.publish(per_method=1, prefix="stateful")  # the stateless phase deleted some: tasks to aim at again
    machine = api_schema.as_state_machine()
    steps: collections.Counter = collections.Counter()
    problems: list[str] = []

    class Checked(machine):  # every step's answer checked as in the stateless phase
        def after_call(self, response, case) -> None:
            steps[case.operation.label] += 1
            STATUSES[response.status_code] += 1
            ANSWERED[case.operation.label] += response.status_code < 300

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            problem = _check(case, response)
            if problem is not None:
                problems.append(f"{case.as_curl_command()}\n-> {problem}")
            assert problem is None, problems[-1]

    budget, suites, flaky = scale(40, 3000), 0, 0
    while sum(steps.values()) < budget and suites < 50:
        suites += 1
        scenarios = Checked if FULL else hypothesis.seed(suites)(Checked)  # `make test` replays the same suites
        try:
            scenarios.run(settings=settings(max_examples=scale(6, 60), stateful_step_count=15, deadline=None, database=None,
                                            suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate]))
        except Flaky:
            flaky += 1
        assert not problems, f"{len(problems)} bad answers, e.g.\n" + "\n".join(problems[:3])
    TALLY["stateful"] = steps
    ready = httpx.get(f"{fuzzed.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert fuzzed.proc.poll() is None
    per_route = collections.Counter()
    for counts in TALLY.values():
        per_route.update(counts)
    total = sum(per_route.values())
    record("fuzz", schemathesis=schemathesis.__version__, cases=total, stateful_steps=sum(steps.values()), stateful_suites=suites, suites_ended_flaky=flaky,
           cases_by_phase={k: sum(v.values()) for k, v in sorted(TALLY.items())}, cases_by_route=dict(sorted(per_route.items())),
           answered_2xx_by_route=dict(sorted(ANSWERED.items())),
           statuses=dict(sorted(STATUSES.items())), server_errors=sum(n for s, n in STATUSES.items() if s >= 500), readyz_after=ready.status_code,
           stateless_seconds_in_requests=round(sum(SECONDS.values()), 1))
    if FULL:
        assert total >= 5000, f"only {total} cases"


# ---- drill 5: hostile names and links ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("hostile"), TASKSERVE_EMBEDDED_WORKER="false") as d:
        d.publish(per_method=1)
        yield d


def hostile_names(existing: str) -> list[str]:
    """Names that must never reach a file: traversal (plain, percent-encoded, backslashed), absolute
    paths, look-alikes of an existing name (Cyrillic, fullwidth, NFKC-equivalent), overlong, NUL, newline."""
    cyrillic = existing.replace("a", "\u0430").replace("i", "\u0456").replace("p", "\u0440")
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in existing)
    return [
        "..", ".", "../x", "../../../../etc/passwd", "/etc/passwd", "%2e%2e", "%2e%2e%2fx", "..%2f", "..%2fetc%2fpasswd",
        "%252e%252e%252f", "..\\x", "....//x", "x/../../y", ".hidden", "tasks/../..", "\uff0fetc\uff0fpasswd", "\uff0e\uff0e\uff0fx",
        cyrillic, fullwidth, existing.upper(), existing + "\u200b", "a" * 65, "a" * 5000, "a\x00b", existing + "\x00", "\x00../etc/passwd",
        existing + "\n", "a\r\nX-Injected: 1", "\u202e" + existing, "~root", "$(id)",
    ]


@dataclass
class Trace:
    attached: bool = False
    opened: list[str] = field(default_factory=list)
    """Every path the process named or got an fd for (open / create / rename / link / unlink calls)."""


@contextlib.contextmanager
def traced(pid: int, out: Path) -> Iterator[Trace]:
    """What the process (all its threads) opens meanwhile, by strace; `attached` stays False where
    strace is missing or cannot attach (the checks then rest on the behaviour alone)."""
    trace = Trace()
    if shutil.which("strace") is None:
        yield trace
        return
    calls = "trace=open,openat,openat2,creat,rename,renameat,renameat2,mkdir,mkdirat,unlink,unlinkat,symlink,symlinkat,link,linkat"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-s", "4096", "-e", calls, "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not any(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("TracerPid")):
        if tracer.poll() is not None or time.monotonic() > deadline:  # no ptrace here: behaviour only
            tracer.kill()
            tracer.wait()
            yield trace
            return
        time.sleep(0.05)
    trace.attached = True
    try:
        yield trace
    finally:
        time.sleep(0.3)
        tracer.terminate()
        tracer.wait(10)
        for line in out.read_text(errors="replace").splitlines():
            base = None  # with -y strace writes each fd's path in <>: the folder a path is relative to, or the file opened
            for fd_path, arg in re.findall(r'<(/[^>]*)>|"((?:[^"\\]|\\.)*)"', line):
                path = os.fsdecode(codecs.escape_decode((fd_path or arg).encode())[0])  # strace writes bytes as escapes
                if fd_path:
                    base = path
                trace.opened.append(path if fd_path or os.path.isabs(path) or base is None else os.path.join(base, path))


def _outside(paths: list[str], cwd: Path, store: Path, also: tuple[Path, ...] = ()) -> list[str]:
    """The paths (relative ones from the server's cwd) that lead, links resolved, to /etc/passwd, into
    one of `also`, or into the deployment's folder but not its store."""
    bad = []
    for raw in paths:
        real = Path(os.path.realpath(cwd / raw))
        if real == Path("/etc/passwd") or any(real.is_relative_to(a) for a in also) or (real.is_relative_to(store.parent) and not real.is_relative_to(store)):
            bad.append(f"{raw} -> {real}")
    return bad


def _raw(url: str, method: str, path: str, headers: dict[str, str]) -> int:
    """A request whose path goes out exactly as written (httpx would normalise `..` segments)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status == 307:  # a trailing slash dropped (`..%2f` reads `../`): where it leads must be refused too
            return _raw(url, method, urlsplit(response.getheader("location")).path, headers)
        assert response.status < 500, (method, path, response.status, body[:300])
        if response.status > 400:  # a 400 may come from the HTTP parser, before the app
            assert json.loads(body)["error"]["type"], (method, path, body[:300])
        return response.status
    finally:
        connection.close()


def test_hostile_names_are_404_or_422_in_every_route_and_open_no_file_outside_the_store(hostile: Deployment, tmp_path: Path) -> None:
    existing = next(n for n in hostile.tasks if "-ip-" in n)
    names = hostile_names(existing)
    before = sorted(p.relative_to(hostile.root) for p in (hostile.root / "store").rglob("*"))
    statuses: collections.Counter = collections.Counter()
    answers: dict[str, set[int]] = collections.defaultdict(set)
    admin = dict(hostile.headers)

    def saw(route: str, status: int) -> None:
        statuses[status] += 1
        answers[route].add(status)

    with traced(hostile.proc.pid, tmp_path / "strace.txt") as trace, httpx.Client(base_url=hostile.url, timeout=30, headers=admin) as client:
        for name in names:
            for form in (quote(name, safe=""), quote(name, safe="/.%\\~$()")):  # all encoded; slashes, dots and % as they are
                for method, template in (("GET", "/v1/tasks/{}"), ("GET", "/tasks/{}"), ("DELETE", "/v1/tasks/{}"), ("GET", "/v1/tasks/{}/prompt"),
                                         ("GET", "/v1/models/{}"), ("GET", "/v1/jobs/{}"), ("DELETE", "/v1/jobs/{}")):
                    saw(f"{method} {template}", _raw(hostile.url, method, template.format(form), admin))
            bodies = (("/v1/predict", {"task": name, "text": "fine"}), ("/v1/predict", {"inputs": [{"task": existing, "text": "a"}, {"task": name, "text": "b"}]}),
                      ("/v1/tasks", {"name": name, "method": "plain", "labels": ["no", "yes"]}),
                      ("/v1/tasks", {"name": f"combine-{len(name)}", "method": "tpv", "labels": ["no", "yes"], "init": {"combine": {name: 1.0}}}),
                      ("/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2}),
                      ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
            for path, body in bodies:
                response = client.post(path, json=body)
                saw(f"POST {path}", response.status_code)
                assert response.status_code in (404, 422), (path, name, response.status_code, response.text)
                assert response.json()["error"]["type"] in ("not_found", "invalid_request"), response.text
    assert set(statuses) <= {400, 404, 405, 422}, statuses  # 400: the HTTP parser refused the request line
    outside = _outside(trace.opened, Path(__file__).parents[2], hostile.root / "store")
    assert not outside, outside
    after = sorted(p.relative_to(hostile.root) for p in (hostile.root / "store").rglob("*"))
    assert after == before, "the store's files changed"
    for name in hostile.tasks:  # nothing was deleted or shadowed
        got = httpx.get(f"{hostile.url}/v1/tasks/{name}", timeout=10).json()
        assert got["served"] and got["status"] == "ready", got
    for name in (existing + "\n", "../x", "a\x00b"):  # the store's own check (`$` alone would match before a final newline)
        with pytest.raises(InvalidRequest):
            check_task_name(name)
    record("hostile-names", names=len(names), requests=sum(statuses.values()), statuses=dict(sorted(statuses.items())),
           routes=len(answers), traced=trace.attached, paths_traced=len(trace.opened), opened_outside_store=len(outside))


def _artifact_outside(d: Deployment, outside: Path, name: str) -> tuple[Path, str, str]:
    """A valid-looking artifact of a new task `name`, published outside the store; (folder, method, sha256)."""
    task = d.engine.tasks.new(name, "prompt_tuning", CLASSIFY, seed=7)
    with torch.no_grad():
        for p in task.params.values():
            p.add_(torch.randn_like(p) * 0.1)
    manifest = codec.publish_task(outside, task, d.engine.backbone.fingerprint)
    return outside / "tasks" / name / "v1", task.method, manifest["sha256"]


def test_a_link_out_of_the_store_is_refused_without_a_read_through_it(hostile: Deployment, tmp_path: Path) -> None:
    store = hostile.root / "store"
    outside = tmp_path / "elsewhere"
    cases = {}
    for kind in ("folder", "relative-folder", "parent", "weights", "manifest"):
        name = f"link-{kind}"
        folder, method, sha = _artifact_outside(hostile, outside, name)
        target = store / "tasks" / name
        if kind == "folder":
            target.mkdir(parents=True)
            (target / "v1").symlink_to(folder)
        elif kind == "relative-folder":
            target.mkdir(parents=True)
            (target / "v1").symlink_to(os.path.relpath(folder, target))
        elif kind == "parent":
            target.symlink_to(folder.parent)
        else:  # a real folder whose one file is a link out
            (target / "v1").mkdir(parents=True)
            for file in ("weights.safetensors", "manifest.json"):
                real = folder / file
                if file.startswith(kind):
                    (target / "v1" / file).symlink_to(real)
                else:
                    shutil.copy(real, target / "v1" / file)
        cases[name] = (method, sha)

    def settled(name: str) -> bool:  # refused, or (without the check) loaded through the link
        shown = httpx.get(f"{hostile.url}/v1/tasks/{name}", timeout=10).json()
        return shown["status"] != "ready" or shown["served"]

    with traced(hostile.proc.pid, tmp_path / "strace.txt") as trace:
        for name, (method, sha) in cases.items():  # what a publisher's registry flip looks like
            hostile.writer.registry.publish_version(name, method, 1, f"tasks/{name}/v1", sha)
        wait(lambda: all(settled(n) for n in cases), "every linked task refused or loaded", 60)
    outside_reads = _outside(trace.opened, Path(__file__).parents[2], store, also=(outside.resolve(),))
    assert not outside_reads, outside_reads
    for name in cases:
        shown = httpx.get(f"{hostile.url}/v1/tasks/{name}", timeout=10).json()
        assert shown["status"] == "failed" and not shown["served"], shown
        assert re.search(r"outside (the store|its artifact folder) .*links out of .* are refused", shown["error"]), shown
        answer = httpx.post(f"{hostile.url}/v1/predict", json={"task": name, "text": "fine"}, timeout=10)
        assert answer.status_code == 404, answer.text
    for name in hostile.tasks:  # the other tasks are untouched
        assert httpx.get(f"{hostile.url}/v1/tasks/{name}", timeout=10).json()["served"]
    record("store-links", links=len(cases), refused=len(cases), traced=trace.attached, paths_traced=len(trace.opened), reads_through_links=len(outside_reads))
