"""Benchmarks (issue 12): `bench/run` or `python -m bench`; results in bench/RESULTS.md."""
