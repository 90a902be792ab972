"""Method plugins defined only in the tests (loaded through TASKSERVE_PLUGINS)."""
