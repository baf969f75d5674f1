"""The bottom layer: logging, subprocesses and small filesystem helpers.  Imports nothing from
the rest of hakeeper."""
