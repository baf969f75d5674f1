"""hakeeper: PostgreSQL high availability and recovery."""

__version__ = "0.1.0"
