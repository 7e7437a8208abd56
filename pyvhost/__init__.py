"""pyvhost: vhost-user device backends in Python with a compiled dataplane.

The device API (`pyvhost.Device`, `pyvhost.Request`, ...) lives in `pyvhost.device`; it is
loaded on first use, so that `import pyvhost` (and `pyvhost --help`) stays fast.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["ConfigError", "Device", "Pending", "Request", "RequestError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pyvhost import device
        return getattr(device, name)
    raise AttributeError(f"module 'pyvhost' has no attribute {name!r}")
