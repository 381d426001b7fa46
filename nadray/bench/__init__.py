"""Helpers of ``jobs/benchmark.py``: real data replicated to size, memory sampling, the stages.

Every figure is taken next to a baseline measured in the same run (see
BENCHMARKS.md). Nothing here runs at import time.
"""
