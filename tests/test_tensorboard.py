"""TensorBoard scalars written without tensorboardX, read back with tensorboardX's own protobuf
definitions and checksummed with its own CRC-32C (an implementation nobody here wrote)."""
import struct

import pytest

from llamax.train.tensorboard import ScalarWriter, crc32c

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
reference_crc = pytest.importorskip("tensorboardX.crc32c")


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        (length_crc,) = struct.unpack_from("<I", data, offset + 8)
        assert length_crc == masked(reference_crc.crc32c(data[offset:offset + 8]))
        payload = data[offset + 12:offset + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, offset + 12 + length)
        assert payload_crc == masked(reference_crc.crc32c(payload))
        records.append(event_pb2.Event.FromString(payload))
        offset += 16 + length
    return records


def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value
    assert crc32c(b"llamax" * 50) == reference_crc.crc32c(b"llamax" * 50)


def test_scalars_read_back_with_tensorboards_own_protos(tmp_path):
    writer = ScalarWriter(tmp_path / "tb")
    writer.add_scalars(10, {"loss": 4.5, "learning_rate": 3e-4})
    writer.add_scalars(2**40, {"eval_loss": -1.25})  # int64 steps beyond 32 bits
    writer.close()
    (path,) = (tmp_path / "tb").iterdir()
    assert path.name.startswith("events.out.tfevents.")
    header, first, second = read_records(path)
    assert header.file_version == "brain.Event:2"
    assert first.step == 10 and {v.tag: v.simple_value for v in first.summary.value} == \
        {"loss": 4.5, "learning_rate": pytest.approx(3e-4)}
    assert second.step == 2**40 and second.summary.value[0].simple_value == -1.25
    assert first.wall_time > 1.6e9
