"""The store every process shares: task artifacts on disk and the registry of tasks, versions and jobs.

- `artifacts`: one folder per published version (`weights.safetensors` + `manifest.json`), written
  to a temp folder, fsynced and renamed into place, so a reader never sees half an artifact;
- `registry`: tasks, versions and jobs in SQLAlchemy (SQLite file inside the store by default,
  Postgres by URL); a version becomes current in one transaction;
- `codec`: a `server.task.Task` to and from an artifact.
"""
