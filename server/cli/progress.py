"""Progress bars (tqdm) for long work: training stages, and a job followed on a server."""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm


class TrainingBars:
    """`on_progress(stage, Progress)` for multi-task training and few-shot phases: one bar per
    stage on stderr, with the loss and the last validation accuracy."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.stage: str | None = None

    def __call__(self, stage: str, p: Any) -> None:
        if self.bar is None or stage != self.stage:
            self.close()
            self.bar, self.stage = tqdm(total=p.total, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True), stage
        self.bar.total = p.total
        self.bar.update(p.step - self.bar.n)
        postfix = {} if math.isnan(p.loss) else {"loss": f"{p.loss:.4f}"}
        if p.metrics and "val_accuracy" in p.metrics:
            postfix["val"] = f"{p.metrics['val_accuracy']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        if p.step >= p.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JobBar:
    """Follows a job's progress as the server reports it (`client.wait_for_job(on_progress=...)`):
    step / total across its phases, loss, validation, then its final status."""

    def __init__(self, job_id: str) -> None:
        self.bar = tqdm(total=1, desc=f"job {job_id[:8]} queued", unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        if "total" in progress:
            self.bar.total = progress["total"]
            self.bar.update(progress["step"] - self.bar.n)
        self.bar.set_description(f"job {job['id'][:8]} {job['status']}" + (f" ({progress['phase']})" if progress.get("phase") else ""), refresh=False)
        postfix = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in progress.items() if k in ("loss", "val_accuracy", "chosen") and v is not None}
        self.bar.set_postfix(postfix)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            self.bar.close()
