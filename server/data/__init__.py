"""What tasks are and where their data comes from: `TaskSpec` (template, labels, description,
scoring), the BIG-bench / VADER fetcher and readers, the task catalog and seeded splits."""

from server.data.spec import TaskSpec

__all__ = ["TaskSpec"]
