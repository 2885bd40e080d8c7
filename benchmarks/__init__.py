"""pytest-benchmark suites; run with ``pytest benchmarks/ --benchmark-only``."""
