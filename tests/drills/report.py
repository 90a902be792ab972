"""The drills' figures (build/drills/*.json, written by `record`) as the markdown table of
docs/reliability.md: `python tests/drills/report.py [FOLDER]` (run by `make drills`; the fast scale's
figures are in build/drills-fast/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIGURES = Path(__file__).parents[2] / "build" / "drills"


def table(folder: Path = FIGURES) -> str:
    entries = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not entries:
        return f"no drill figures in {folder}"
    machines = sorted({e["machine"] for e in entries})
    lines = [f"Machine: {', '.join(machines)}; scale: {', '.join(sorted({e['scale'] for e in entries}))}.", "",
             "| drill | scale | date (UTC) | figures |", "|---|---|---|---|"]
    for e in entries:
        figures = ", ".join(f"{k} {v}" for k, v in e["figures"].items())
        lines.append(f"| {e['drill']} | {e['scale']} | {e['date'][:16].replace('T', ' ')} | {figures} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else FIGURES))
