"""kvapi: a key-value store inside PostgreSQL."""

__version__ = "0.1.0"
