"""Backup and restore commands (``hakeeper backup ...``, ``hakeeper restore``): being written."""
