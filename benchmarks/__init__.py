"""shopserve's performance harness: perf_analyzer scenarios on the real query log, the baselines
measured beside the Triton ensemble, tuning experiments, and the report (``python -m benchmarks``).

Not part of the installed ``shopserve`` distribution: run it from the project root.
"""
