"""taskserve server: the frozen backbone, the per-task methods, the engine and the HTTP API."""
