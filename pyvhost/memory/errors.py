"""Errors of the memory layer. A frontend's bad region is its fault: `BadRegionError`."""


class MemoryError_(Exception):
    """Base of memory-layer errors (named so it does not shadow the builtin MemoryError)."""


class BadRegionError(MemoryError_):
    """A region the frontend described cannot be mapped or conflicts with another one."""


class AddressNotMappedError(MemoryError_):
    """An address (or part of a range) lies outside every mapped region."""

    def __init__(self, space: str, addr: int, length: int) -> None:
        super().__init__(f"{space} address range 0x{addr:x}+{length} is not mapped")
        self.space = space
        self.addr = addr
        self.length = length
