"""Benchmarks: `vhost` (pyvhost against DPDK's vhost PMD, `pyvhost bench`), `ring` (the
compiled TX burst in process), `requests` (the Python device tier in process)."""

__all__ = ["requests", "ring", "vhost"]
