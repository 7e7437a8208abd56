"""`pyvhost blk`: the image is opened once, here, and shared by every connection's device."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from pyvhost.devices.blk.device import BlkDevice, choose_io, serial_bytes
from pyvhost.devices.blk.io import BlkImage

if TYPE_CHECKING:
    from pyvhost.cli import DeviceSetup
    from pyvhost.device import Device


def build(args: argparse.Namespace, cls: type[Device]) -> DeviceSetup:
    from pyvhost.cli import DeviceSetup, SetupError, UsageError

    if not issubclass(cls, BlkDevice):
        raise UsageError(f"{cls.__qualname__} is not a BlkDevice")
    blk_cls = cls
    q = args.queue_size
    if not 1 <= args.queues <= 0xFFFF:
        raise UsageError(f"--queues {args.queues}: outside 1..65535")
    if q < 2 or q > 32768 or q & (q - 1):
        raise UsageError(f"--queue-size {q}: not a power of two in 2..32768")
    if args.io_threads < 1:
        raise UsageError("--io-threads must be at least 1")
    try:
        serial = serial_bytes(args.serial)
    except ValueError as exc:
        raise UsageError(f"--serial: {exc}") from None
    if args.file is None and args.null is None:
        raise UsageError("one of --file IMAGE or --null SIZE is required")
    if args.null is not None:
        if args.direct:
            raise UsageError("--direct needs a --file")
        try:
            image = BlkImage.open_null(parse_size(args.null), readonly=args.readonly)
        except ValueError as exc:
            raise UsageError(f"--null {args.null}: {exc}") from None
    else:
        try:
            image = BlkImage.open(args.file, readonly=args.readonly, direct=args.direct)
        except (OSError, ValueError) as exc:
            raise SetupError(f"cannot open --file {args.file}: {exc}") from None
    try:
        io = choose_io(args.io, image)
    except ValueError as exc:
        image.close()
        raise SetupError(f"--io {args.io}: {exc}") from None
    if image.size % 512:
        logging.getLogger("pyvhost").warning(
            "%s: size %d is not a multiple of 512; its last %d bytes are not on the disk",
            image.path, image.size, image.size % 512)

    def device() -> Device:
        return blk_cls(image, queues=args.queues, queue_size=q, serial=serial,
                       io_threads=args.io_threads, io=io)

    return DeviceSetup(factory=device, close=image.close)


def parse_size(text: str) -> int:
    """Bytes from "SIZE[K|M|G|T]" (powers of 1024; a trailing "iB" or "B" is allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if t and t[-1] in "KMGT":
        scale = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        value = int(t)
    except ValueError:
        raise ValueError(f"not a size ({text!r}: a number with K, M, G or T)") from None
    if value <= 0:
        raise ValueError("must be positive")
    return value * scale
