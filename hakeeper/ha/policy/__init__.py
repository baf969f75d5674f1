"""The HA policy as pure data and functions: no I/O, no clock, no logging.

``decide.py`` holds the situation -> action table and the per-action flags; ``candidates.py``
who may be promoted and in what order; ``switchover.py`` and ``sync.py`` the pure planners the
executors ask before they act.  Everything here is tested as tables (``tests/unit/ha/``).
"""
