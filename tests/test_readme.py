"""The README's configuration table names every setting (it is written by hand; this keeps it true)."""

from __future__ import annotations

from pathlib import Path

from server.settings import Settings


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert readme.startswith("```bash\nmake serve")
    missing = [name for name in Settings.model_fields if f"`TASKSERVE_{name.upper()}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
