"""Drills see the harness next to them (tests/ is already on the path for helpers and serving)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
