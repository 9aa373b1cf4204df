"""TensorBoard scalars without TensorBoard: an event file written directly.

The format is TFRecord framing around `tensorflow.Event` protos, and a scalar needs only a few of
their fields, so writing them here takes a few dozen lines. (tensorboardX, the usual choice,
imports PyTorch when it is installed: 1.5-3 s added to every run's start.)

    record  = uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
    Event   = wall_time (1, double) | step (2, int64) | file_version (3, string) | summary (5)
    Summary = value (1, repeated) ; Value = tag (1, string) | simple_value (2, float)
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 fields are encoded as their two's complement
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def _event(step: int, wall_time: float, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    event = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        event += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        event += _bytes_field(5, values)
    return event


class ScalarWriter:
    """Appends scalar summaries to a new event file in `folder` (what `tensorboard --logdir`
    reads)."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        length = struct.pack("<Q", len(data))
        self._file.write(length + struct.pack("<I", _masked_crc(length)) + data
                         + struct.pack("<I", _masked_crc(data)))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._write(_event(step, time.time(), scalars=scalars))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
