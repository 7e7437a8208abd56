"""pyvhost: vhost-user device backends in Python with a compiled dataplane."""

__version__ = "0.1.0"
