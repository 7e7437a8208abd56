"""The devices pyvhost ships: virtio-net (`net/`) and virtio-rng (`rng.py`)."""
