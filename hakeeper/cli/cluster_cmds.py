"""Cluster read commands (list, history)."""

from __future__ import annotations
