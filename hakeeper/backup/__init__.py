"""Backups and WAL archiving (issue 5): repositories, object codec, configuration."""
