"""The registry of tasks, versions and jobs (SQLAlchemy 2): SQLite inside the store by default,
Postgres by URL (`TASKSERVE_DB_URL`).

Shared method modules (IP nets, PHA hypernetwork, ATTEMPT sources, TPV origins) are versioned the
same way in `modules`; a task version records the module version it was made with.
A task row points at its current version; publishing a version inserts the version row and flips
the pointer in ONE transaction, after the artifact folder is complete on disk — so a reader that
finds a current version always finds its files. Deleting a task removes its rows (the serving
process stops serving it on its next poll); old version folders stay until garbage-collected.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, create_engine, delete, event, func, select
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from server.errors import Conflict, NotFound, Overloaded, Unavailable
from server.task import check_task_name

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class TaskRow(Base):
    __tablename__ = "tasks"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    method: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="ready")  # pending | ready | failed
    current_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class VersionRow(Base):
    __tablename__ = "versions"
    task: Mapped[str] = mapped_column(ForeignKey("tasks.name", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ModuleRow(Base):
    """A published version of a method's shared module; the highest version is the current one."""

    __tablename__ = "modules"
    method: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    task: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


def _as_dict(row: Base) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


def _key(value: str, what: str) -> str:
    """A name or id to look up. One holding a NUL byte names nothing (none is ever written: names are
    checked, ids are uuids), and PostgreSQL cannot even compare it (DataError, a 500): NotFound at once."""
    if "\x00" in value:
        raise NotFound(f"{what} {value!r} does not exist")
    return value


class Registry:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, future=True, pool_pre_ping=True)
        self.where = self.engine.url.render_as_string(hide_password=True)
        event.listen(self.engine, "handle_error", self._unavailable)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._was_read_only = False  # `read_only` saw the SQLite file unwritable: connections opened then are read-only

    def close(self) -> None:
        self.engine.dispose()

    def _unavailable(self, context: ExceptionContext) -> None:
        """A database that cannot be reached or written — a refused or dropped connection, a SQLite
        file that is read-only, full or locked — raises Unavailable (503) naming it and why; other
        errors pass unchanged. A failed pre-ping is left to the pool, which reconnects."""
        if context.is_pre_ping or not (context.is_disconnect or isinstance(context.sqlalchemy_exception, (OperationalError, InterfaceError))):
            return
        reason = " ".join(str(context.original_exception).split()) or type(context.original_exception).__name__
        raise Unavailable(f"the registry ({self.where}) is unavailable: {reason}")

    def ping(self) -> None:
        """A round trip to the database; Unavailable, with the reason, if it does not answer."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def read_only(self) -> str | None:
        """Why a SQLite registry's files cannot be written (reads still succeed, every write would
        fail), or None."""
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:":
            return None
        path = Path(database)
        for item in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))):
            if item.exists() and not os.access(item, os.W_OK):
                self._was_read_only = True
                return f"the registry ({self.where}) is read-only: {item.name} cannot be written, every change would fail"
        if self._was_read_only:  # SQLite opened connections of that spell read-only, for good: drop them
            self._was_read_only = False
            self.engine.dispose()
        return None

    # ---- tasks and versions ----------------------------------------------------------------
    def publish_version(self, name: str, method: str, version: int, path: str, sha256: str) -> None:
        """Insert a version and make it current, creating the task row if needed (one transaction)."""
        check_task_name(name)
        with self._session.begin() as s:
            task = s.get(TaskRow, name, with_for_update=True)
            if task is None:
                task = TaskRow(name=name, method=method)
                s.add(task)
            elif task.method != method:
                if task.current_version is not None:
                    raise Conflict(f"task {name!r} exists with method {task.method!r}")
                task.method = method  # a reservation whose job published another method's task (the zero-shot guard)
            if s.get(VersionRow, (name, version)) is None:
                s.add(VersionRow(task=name, version=version, path=path, sha256=sha256))
            task.current_version, task.status, task.error = version, "ready", None

    def versions(self, name: str) -> list[int]:
        """Every published version of `name`, oldest first."""
        with self._session() as s:
            return sorted(s.scalars(select(VersionRow.version).where(VersionRow.task == name)).all())

    def next_version(self, name: str) -> int:
        return max(self.versions(name), default=0) + 1

    def reserve(self, name: str, method: str) -> None:
        """Claim a new task name (status pending); 409 if it is taken. A name whose only trace is a
        failed training (no version) can be claimed again."""
        check_task_name(name)
        try:
            with self._session.begin() as s:
                row = s.get(TaskRow, name, with_for_update=True)
                if row is not None and row.status == "failed" and row.current_version is None:
                    row.method, row.status, row.error = method, "pending", None
                    return
                s.add(TaskRow(name=name, method=method, status="pending"))
        except IntegrityError:
            raise Conflict(f"task {name!r} already exists") from None

    def exists(self, name: str) -> bool:
        with self._session() as s:
            return "\x00" not in name and s.get(TaskRow, name) is not None

    def get_task(self, name: str) -> dict[str, Any]:
        with self._session() as s:
            row = s.get(TaskRow, _key(name, "task"))
            if row is None:
                raise NotFound(f"task {name!r} does not exist")
            out = _as_dict(row)
            if row.current_version is not None:
                out["current"] = _as_dict(s.get(VersionRow, (name, row.current_version)))
            return out

    def list_tasks(self) -> list[dict[str, Any]]:
        with self._session() as s:
            return [_as_dict(r) for r in s.scalars(select(TaskRow).order_by(TaskRow.name))]

    def mark_failed(self, name: str, error: str) -> None:
        with self._session.begin() as s:
            row = s.get(TaskRow, name)
            if row is not None:
                row.status, row.error = "failed", error

    def delete_task(self, name: str) -> None:
        with self._session.begin() as s:
            row = s.get(TaskRow, _key(name, "task"))
            if row is None:
                raise NotFound(f"task {name!r} does not exist")
            s.execute(delete(VersionRow).where(VersionRow.task == name))
            s.execute(delete(TaskRow).where(TaskRow.name == name))

    # ---- shared modules ------------------------------------------------------------------------
    def add_module(self, method: str, version: int, path: str, sha256: str) -> bool:
        """Register a published module version; False if that version exists already (another
        process published it first)."""
        try:
            with self._session.begin() as s:
                s.add(ModuleRow(method=method, version=version, path=path, sha256=sha256))
            return True
        except IntegrityError:
            return False

    def current_modules(self) -> dict[str, int]:
        """method -> highest published version."""
        with self._session() as s:
            rows = s.execute(select(ModuleRow.method, func.max(ModuleRow.version)).group_by(ModuleRow.method)).all()
            return {method: version for method, version in rows}

    def module_sha256(self, method: str, version: int) -> str | None:
        with self._session() as s:
            row = s.get(ModuleRow, (method, version))
            return row.sha256 if row is not None else None

    def module_exists(self, method: str, version: int) -> bool:
        with self._session() as s:
            return s.get(ModuleRow, (method, version)) is not None

    # ---- jobs ---------------------------------------------------------------------------------
    def enqueue(self, name: str, method: str, request: dict[str, Any], max_queued: int) -> dict[str, Any]:
        """Reserve the name and queue its training job in one transaction — or neither: Conflict if
        the name is taken, Overloaded when `max_queued` jobs wait already (counted in the same
        transaction, so the bound holds however many requests race)."""
        check_task_name(name)
        try:
            with self._session.begin() as s:
                if self._count(s, "queued") >= max_queued:
                    raise Overloaded(f"{max_queued} training jobs are waiting for a worker already", retry_after=30.0)
                row = s.get(TaskRow, name, with_for_update=True)
                if row is not None and row.status == "failed" and row.current_version is None:
                    row.method, row.status, row.error = method, "pending", None
                elif row is not None:
                    raise Conflict(f"task {name!r} already exists")
                else:
                    s.add(TaskRow(name=name, method=method, status="pending"))
                job = JobRow(task=name, request=request)
                s.add(job)
                s.flush()
                return _as_dict(job)
        except IntegrityError:
            raise Conflict(f"task {name!r} already exists") from None

    @staticmethod
    def _count(s, status: str) -> int:
        return int(s.scalar(select(func.count()).select_from(JobRow).where(JobRow.status == status)))

    def job_counts(self) -> dict[str, int]:
        """Jobs per state, every state of JOB_STATES present (one grouped query)."""
        with self._session() as s:
            counted = dict(s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
        return {state: int(counted.get(state, 0)) for state in JOB_STATES}

    def count_jobs(self, status: str) -> int:
        with self._session() as s:
            return self._count(s, status)

    def create_job(self, task: str, request: dict[str, Any]) -> dict[str, Any]:
        with self._session.begin() as s:
            job = JobRow(task=task, request=request)
            s.add(job)
            s.flush()
            return _as_dict(job)

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self._session() as s:
            row = s.get(JobRow, _key(job_id, "job"))
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            return _as_dict(row)

    def list_jobs(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest jobs first (optionally of one status)."""
        with self._session() as s:
            query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
            if status is not None:
                query = query.where(JobRow.status == status)
            return [_as_dict(r) for r in s.scalars(query)]

    def update_job(self, job_id: str, **fields: Any) -> dict[str, Any]:
        if "status" in fields and fields["status"] not in JOB_STATES:
            raise ValueError(f"status must be one of {JOB_STATES}")
        with self._session.begin() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            for key, value in fields.items():
                setattr(row, key, value)
            return _as_dict(row)

    def claim_job(self, worker: str, lease_s: float, max_attempts: int) -> dict[str, Any] | None:
        """The oldest queued job, now running under `worker` with a lease; None if none is queued.
        Running jobs whose lease expired (their worker died) are first re-queued, or failed after
        `max_attempts`. Two workers never claim the same job (row locks; SQLite serialises writes)."""
        now = _now()
        with self._session.begin() as s:
            expired = s.scalars(select(JobRow).where(JobRow.status == "running", JobRow.lease_until < now).with_for_update(skip_locked=True)).all()
            for job in expired:
                if job.attempts >= max_attempts:
                    job.status, job.error, job.worker = "failed", f"worker {job.worker} stopped renewing its lease; gave up after {job.attempts} attempts", None
                    self._fail_reservation(s, job.task, job.error)
                else:
                    job.status, job.worker, job.lease_until = "queued", None, None
            job = s.scalars(select(JobRow).where(JobRow.status == "queued").order_by(JobRow.created_at).limit(1).with_for_update(skip_locked=True)).first()
            if job is None:
                return None
            job.status, job.worker, job.attempts = "running", worker, job.attempts + 1
            job.lease_until = now + timedelta(seconds=lease_s)
            return _as_dict(job)

    def renew_job(self, job_id: str, worker: str, lease_s: float, progress: dict[str, Any] | None = None) -> str:
        """Extend `worker`'s lease (and record progress); returns the job's status — `cancelled`
        tells the worker to stop. A worker that lost its lease gets `lost`."""
        with self._session.begin() as s:
            job = s.get(JobRow, job_id, with_for_update=True)
            if job is None:
                return "cancelled"
            if job.status != "running" or job.worker != worker:
                return job.status if job.status == "cancelled" else "lost"
            job.lease_until = _now() + timedelta(seconds=lease_s)
            if progress is not None:
                job.progress = progress
            return job.status

    def finish_job(self, job_id: str, worker: str, status: str, *, metrics: dict[str, Any] | None = None, error: str | None = None) -> bool:
        """Record the end of `worker`'s run; False (nothing written) if the job is no longer its own."""
        with self._session.begin() as s:
            job = s.get(JobRow, job_id, with_for_update=True)
            if job is None or job.status != "running" or job.worker != worker:
                return False
            job.status, job.error, job.lease_until = status, error, None
            if metrics is not None:
                job.metrics = metrics
            if status == "failed":
                self._fail_reservation(s, job.task, error or "training failed")
            return True

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (a running worker stops at its next lease renewal)."""
        with self._session.begin() as s:
            job = s.get(JobRow, _key(job_id, "job"), with_for_update=True)
            if job is None:
                raise NotFound(f"job {job_id!r} does not exist")
            if job.status not in ("queued", "running"):
                raise Conflict(f"job {job_id} already {job.status}")
            job.status, job.lease_until = "cancelled", None
            task = s.get(TaskRow, job.task)
            if task is not None and task.current_version is None:
                s.delete(task)  # the name is free again
            return _as_dict(job)

    @staticmethod
    def _fail_reservation(s, name: str, error: str) -> None:
        task = s.get(TaskRow, name)
        if task is not None and task.current_version is None:
            task.status, task.error = "failed", error


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
