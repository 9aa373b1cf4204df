"""Memory-mapped .pth reading and streaming .pth writing, checked against plain torch.save/load."""
import ml_dtypes
import numpy as np
import pytest
import torch

from llamax.errors import CheckpointError
from llamax.convert.pth import PthFile, PthWriter


def test_pth_file_reads_what_torch_saved(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "view": torch.randn(10, 4)[2:5].clone()}
    torch.save(tensors, tmp_path / "x.pth")
    pth = PthFile(tmp_path / "x.pth")
    assert pth.keys() == list(tensors)
    for name, tensor in tensors.items():
        got = pth.get(name)
        if tensor.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16
            assert np.array_equal(got.view(np.int16), tensor.view(torch.int16).numpy())
        else:
            assert np.array_equal(got, tensor.numpy())


def test_pth_writer_output_loads_in_torch_in_any_write_order(tmp_path):
    arrays = {"w": np.random.rand(16, 8).astype(np.float32),
              "v": np.random.rand(5).astype(ml_dtypes.bfloat16), "n": np.ones(3, np.float32)}
    writer = PthWriter(tmp_path / "y.pth", {k: (v.shape, v.dtype) for k, v in arrays.items()})
    for name in ["n", "v", "w"]:
        writer.write(name, arrays[name])
    writer.close()
    loaded = torch.load(tmp_path / "y.pth", weights_only=True)
    assert list(loaded) == list(arrays)
    assert np.array_equal(loaded["w"].numpy(), arrays["w"])
    assert np.array_equal(loaded["v"].view(torch.int16).numpy(), arrays["v"].view(np.int16))


def test_pth_writer_checks_shapes_and_completeness(tmp_path):
    writer = PthWriter(tmp_path / "z.pth", {"w": ((2, 2), np.float32), "u": ((3,), np.float32)})
    with pytest.raises(CheckpointError, match="declared"):
        writer.write("w", np.zeros((2, 3), np.float32))
    writer.write("w", np.zeros((2, 2), np.float32))
    with pytest.raises(CheckpointError, match="never written"):
        writer.close()


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    (tmp_path / "not.pth").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a torch zip"):
        PthFile(tmp_path / "not.pth")
    torch.save({"x": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="flat dict of tensors"):
        PthFile(tmp_path / "list.pth")
