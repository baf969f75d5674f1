"""The executors of HA decisions, one concern per module: ``bootstrap`` (initialize a cluster),
``replica`` (clone, start, follow, rewind, detach, demote), ``leader`` (campaign, promote, lead,
release) and ``handover`` (switchover).  :mod:`hakeeper.ha.actions.table` maps every
:class:`~hakeeper.ha.policy.decide.Action` to its executor."""
