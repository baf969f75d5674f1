"""Pure data shared by every layer: the cluster model, the etcd key table, configuration
schemas, LSN and time formatting.  Nothing here does I/O (``config.load_node_config``, which
reads the node file, is the one deliberate exception)."""
