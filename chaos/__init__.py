"""hakeeper's fault-injection suite: ``python -m chaos run SCENARIO [--runs N] [--mode M]``."""
