"""The research harness, apart from the library: memory curves, benchmarks, the
experiment grid, and the reports and plots they write. Nothing in the library imports it."""
