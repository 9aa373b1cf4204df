"""Loading weights we did not write: pickles that would run code are refused, safetensors win over
pickles, and no file name (index entry, symlink) can make us read outside the checkpoint folder.

Every malicious pickle here is live: `test_the_payload_is_live` shows that loading it the unsafe
way (`weights_only=False`) does run it; llamax's loaders must refuse it without running it.
"""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from llamax.convert import weight_files as weights_io
from llamax.config import ModelConfig
from llamax.convert import expected_hf_shapes, hf_to_params, load_hf, save_hf
from llamax.convert.meta import load_meta, save_meta
from llamax.errors import CheckpointError
from llamax.convert.pth import PthFile
from llamax.convert.weight_files import WeightFolder

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=48, num_layers=1,
                     num_heads=2, num_kv_heads=1)


class Payload:
    """Unpickling this writes `marker` (an attacker would run a shell command instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_malicious(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """A state dict with one real tensor and one code-running object, as torch.save writes it
    (zip archive) or as a bare pickle (the pre-1.6 format torch.load still accepts)."""
    state = {"model.norm.weight": torch.ones(CONFIG.hidden_size), "evil": Payload(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    return path


def random_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tensors = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in expected_hf_shapes(CONFIG).items()}
    return hf_to_params(CONFIG, tensors)


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    """A valid single-file safetensors HF checkpoint."""
    return save_hf(CONFIG, random_params(), tmp_path / "hf")


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    path = write_malicious(tmp_path / "evil.bin", marker)
    torch.load(path, weights_only=False)  # what a careless loader does
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_pickle"])
def test_malicious_pytorch_model_bin_is_refused(tmp_path, hf_folder, legacy):
    marker = tmp_path / "ran"
    (hf_folder / "model.safetensors").unlink()
    write_malicious(hf_folder / "pytorch_model.bin", marker, legacy=legacy)
    # zip: torch's weights_only unpickler rejects the global; legacy: torch refuses to mmap it.
    with pytest.raises(CheckpointError, match=r"refusing or unable to load .*pytorch_model\.bin.*"
                                              r"weights_only=True"):
        load_hf(hf_folder)
    assert not marker.exists()


def test_malicious_shard_named_by_a_bin_index_is_refused(tmp_path, hf_folder):
    marker = tmp_path / "ran"
    (hf_folder / "model.safetensors").unlink()
    write_malicious(hf_folder / "pytorch_model-00001-of-00001.bin", marker)
    index = {"weight_map": {name: "pytorch_model-00001-of-00001.bin" for name in expected_hf_shapes(CONFIG)}}
    (hf_folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_hf(hf_folder)
    assert not marker.exists()


def test_malicious_consolidated_pth_is_refused(tmp_path):
    marker = tmp_path / "ran"
    meta = save_meta(CONFIG, random_params(), tmp_path / "meta")
    write_malicious(meta / "consolidated.00.pth", marker)
    with pytest.raises(CheckpointError, match=r"refusing or unable to load .*consolidated\.00\.pth"
                                              r".*weights_only=True"):
        load_meta(meta)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        PthFile(meta / "consolidated.00.pth")
    assert not marker.exists()


def test_pickle_of_plain_non_tensor_values_is_refused(tmp_path):
    """weights_only admits ints and lists; a state dict must still be all tensors."""
    path = tmp_path / "odd.bin"
    torch.save({"w": torch.ones(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match="not a flat dict of tensors"):
        PthFile(path)


@pytest.mark.parametrize("layout", ["single", "bin_index"])
def test_safetensors_win_over_a_malicious_bin_which_is_never_opened(tmp_path, hf_folder, layout,
                                                                    monkeypatch):
    marker = tmp_path / "ran"
    write_malicious(hf_folder / "pytorch_model.bin", marker)
    if layout == "bin_index":  # a .bin index next to a single model.safetensors
        index = {"weight_map": {name: "pytorch_model.bin" for name in expected_hf_shapes(CONFIG)}}
        (hf_folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    config, params = load_hf(hf_folder)
    assert WeightFolder(hf_folder).format == "safetensors"
    assert opened == [] and not marker.exists()
    np.testing.assert_array_equal(params["norm"]["weight"], random_params()["norm"]["weight"])


# ---- paths that try to leave the checkpoint folder -------------------------------------------

def sharded_copy(hf_folder: Path, tmp_path: Path, fmt: str) -> Path:
    """The checkpoint re-laid out as one shard named by an index (safetensors or torch)."""
    folder = tmp_path / f"sharded_{fmt}"
    folder.mkdir()
    tensors = dict(WeightFolder(hf_folder))
    shard = "model-00001-of-00001.safetensors" if fmt == "safetensors" else "pytorch_model-00001.bin"
    if fmt == "safetensors":
        weights_io.save_safetensors(folder / shard, tensors)
    else:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, folder / shard)
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index_name).write_text(json.dumps({"weight_map": {n: shard for n in tensors}}))
    return folder


def point_one_entry_at(folder: Path, file_name: str) -> None:
    index_path = next(folder.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = file_name
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_sharded_copies_load(tmp_path, hf_folder, fmt):
    _, params = load_hf(sharded_copy(hf_folder, tmp_path, fmt))
    np.testing.assert_array_equal(params["norm"]["weight"], random_params()["norm"]["weight"])


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("attack", ["absolute", "dotdot", "nested_dotdot", "symlink_file",
                                    "symlink_dir", "empty", "not_a_string", "nul_byte"])
def test_index_entries_cannot_escape_the_folder(tmp_path, hf_folder, fmt, attack):
    folder = sharded_copy(hf_folder, tmp_path, fmt)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / ("secret.safetensors" if fmt == "safetensors" else "secret.bin")
    secret.write_bytes((folder / next(p.name for p in folder.iterdir() if "00001" in p.name)).read_bytes())
    name = {
        "absolute": str(secret),
        "dotdot": f"../outside/{secret.name}",
        "nested_dotdot": f"sub/../../outside/{secret.name}",
        "symlink_file": "link" + secret.suffix,
        "symlink_dir": f"linked_dir/{secret.name}",
        "empty": "",
        "not_a_string": 7,
        "nul_byte": "model\x00.safetensors",
    }[attack]
    if attack == "symlink_file":
        os.symlink(secret, folder / name)
    if attack == "symlink_dir":
        os.symlink(outside, folder / "linked_dir")
    point_one_entry_at(folder, name)
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder|not a plain file name"):
        load_hf(folder)


def test_single_weight_file_symlinked_outside_is_refused(tmp_path, hf_folder):
    outside = tmp_path / "elsewhere.safetensors"
    (hf_folder / "model.safetensors").rename(outside)
    os.symlink(outside, hf_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder"):
        load_hf(hf_folder)


def test_meta_shard_symlinked_outside_is_refused(tmp_path):
    meta = save_meta(CONFIG, random_params(), tmp_path / "meta")
    outside = tmp_path / "stolen.pth"
    (meta / "consolidated.00.pth").rename(outside)
    os.symlink(outside, meta / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder"):
        load_meta(meta)


def test_hub_cache_snapshot_symlinks_into_its_own_blobs_still_load(tmp_path, hf_folder):
    """`huggingface_hub` stores `<repo>/snapshots/<rev>/<file>` as symlinks to `<repo>/blobs/`:
    those stay loadable; a symlink from a snapshot to anywhere else does not."""
    repo = tmp_path / "hub" / "models--x--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, file in enumerate(sorted(hf_folder.iterdir())):
        blob = blobs / f"blob{index}"
        file.rename(blob)
        os.symlink(Path("../../blobs") / blob.name, snapshot / file.name)
    _, params = load_hf(snapshot)
    np.testing.assert_array_equal(params["norm"]["weight"], random_params()["norm"]["weight"])
    (snapshot / "model.safetensors").unlink()
    os.symlink(tmp_path / "nowhere.safetensors", snapshot / "model.safetensors")
    (tmp_path / "nowhere.safetensors").write_bytes((blobs / "blob1").read_bytes())
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder"):
        load_hf(snapshot)
