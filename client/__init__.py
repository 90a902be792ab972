"""Python client (sync and async over httpx); filled by the client issue."""
