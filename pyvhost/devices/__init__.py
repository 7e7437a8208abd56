"""The devices pyvhost ships: virtio-net (`net/`), virtio-blk (`blk/`), virtio-rng (`rng.py`)."""
