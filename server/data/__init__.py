"""Task specifications and (in the learning issue) readers for the offline data sets."""

from server.data.spec import TaskSpec

__all__ = ["TaskSpec"]
