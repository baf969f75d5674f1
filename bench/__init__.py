"""Benchmarks of hakeeper on a local cluster (not tests; run them as ``python -m bench.<name>``)."""
