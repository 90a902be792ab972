"""Every catalog task loads from the real fetched data (marker `real`; skipped until
`taskserve data fetch` has filled the cache)."""

from __future__ import annotations

from collections import Counter

import pytest

from server.data.catalog import CATALOG, load, source_path, spec
from server.data.splits import split
from server.settings import Settings

pytestmark = pytest.mark.real

DATA_DIR = Settings().cache_dir / "data"
MISSING = [name for name, task in CATALOG.items() if not source_path(task, DATA_DIR).is_file()]


@pytest.mark.parametrize("name", list(CATALOG))
def test_catalog_task_loads_from_real_data(name: str) -> None:
    if name in MISSING:  # per task: one archive fetched without the other still tests its tasks
        pytest.skip(f"no fetched data for {name} in {DATA_DIR} (run `taskserve data fetch`)")
    data = load(name, DATA_DIR)
    counts = Counter(e.label for e in data.examples)
    assert len(data.examples) >= 90
    assert len(counts) >= 2 and set(counts) <= set(data.task.labels)
    assert all(0 < len(e.text) <= data.task.max_chars for e in data.examples)
    assert "{text}" not in spec(data.task).render(data.examples[0].text)
    parts = split(data.examples, seed=0)
    assert parts.train and parts.test
