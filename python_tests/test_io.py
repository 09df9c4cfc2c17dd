"""mars_native.io: safe loading and saving of state_dicts (.safetensors, .pt/.pth, .npz)."""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from mars_native import io

torch = pytest.importorskip("torch")


def _state() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("conv1.weight", torch.randn(4, 3, 3, 3, generator=g)),
            ("bn1.running_var", torch.rand(4, generator=g, dtype=torch.float64)),
            ("bn1.num_batches_tracked", torch.tensor(7)),
            ("half", torch.randn(5, generator=g).half()),
            ("flags", torch.tensor([True, False])),
            # names np.savez would choke on (they are its own keyword arguments)
            ("file", torch.arange(3, dtype=torch.int32)),
            ("allow_pickle", torch.zeros(2)),
        ]
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt", ".pth"])
def test_round_trip_keeps_names_values_and_dtypes(tmp_path, suffix):
    state = _state()
    path = tmp_path / f"model{suffix}"
    io.save_state_dict(state, path)
    loaded = io.load_state_dict(path)
    assert set(loaded) == set(state)
    if suffix != ".safetensors":  # safetensors stores names sorted
        assert list(loaded) == list(state)
    for key, tensor in state.items():
        arr = loaded[key]
        assert isinstance(arr, np.ndarray), key
        np.testing.assert_array_equal(arr, tensor.numpy(), err_msg=key)
        assert arr.dtype == tensor.numpy().dtype, key
        assert arr.shape == tuple(tensor.shape), key  # 0-d stays 0-d
    assert not list(tmp_path.glob(".tmp-*")), "the temporary file of the atomic write was left behind"


def test_numpy_states_are_saved_too(tmp_path):
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],  # strided
             "b": np.arange(3, dtype=">f8"),  # big-endian
             "scalar": np.array(2.5, np.float32)}
    for suffix in (".safetensors", ".npz", ".pt"):
        io.save_state_dict(state, tmp_path / f"m{suffix}")
        loaded = io.load_state_dict(tmp_path / f"m{suffix}")
        np.testing.assert_array_equal(loaded["w"], state["w"])
        np.testing.assert_array_equal(loaded["b"], state["b"])
        assert loaded["w"].shape == (3, 2) and loaded["scalar"].shape == ()


def test_bfloat16_is_read_as_float32(tmp_path):
    state = {"w": torch.randn(6).to(torch.bfloat16)}
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"bf16{suffix}"
        if suffix == ".pt":
            torch.save(state, path)
        else:
            import safetensors.torch

            safetensors.torch.save_file(state, str(path))
        loaded = io.load_state_dict(path)
        assert loaded["w"].dtype == np.float32
        np.testing.assert_array_equal(loaded["w"], state["w"].float().numpy())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_checkpoint_wrappers_are_unwrapped(tmp_path, wrapper):
    state = _state()
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, wrapper: state}, tmp_path / "ckpt.pt")
    loaded = io.load_state_dict(tmp_path / "ckpt.pt")
    assert list(loaded) == list(state)


class _CreatesAFile:
    """Unpickling this object calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_in_pt_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.ones(2, 2), "payload": _CreatesAFile(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"evil\.pt: refused: .*pickle code execution"):
        io.load_state_dict(path)
    assert not marker.exists(), "the pickle payload was executed"


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_as_raw_pickle_file_is_refused(tmp_path, protocol):
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    # the legacy (non-zip) torch format is a bare pickle stream
    path.write_bytes(pickle.dumps({"w": _CreatesAFile(str(marker))}, protocol=protocol))
    # protocol 2 reaches the forbidden global; torch's restricted unpickler does not even parse
    # protocol 4's framing. Either way: refused, nothing executed.
    expected = r"evil\.pth: refused: .*pickle code execution" if protocol == 2 else r"evil\.pth: "
    with pytest.raises(ValueError, match=expected):
        io.load_state_dict(path)
    assert not marker.exists()


def test_object_arrays_in_npz_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npz"
    np.savez(path, w=np.ones(3), payload=np.array([_CreatesAFile(str(marker))], dtype=object))
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"evil\.npz: refused: .*pickle"):
        io.load_state_dict(path)
    assert not marker.exists()


def test_pickle_disguised_as_npz_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(_CreatesAFile(str(marker))))
    with pytest.raises(ValueError, match=r"evil\.npz: refused"):
        io.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04broken zip"])
def test_corrupt_files_raise_value_error_naming_the_file(tmp_path, suffix, content):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"bad\{suffix}"):
        io.load_state_dict(path)


def test_truncated_safetensors_is_refused(tmp_path):
    io.save_state_dict({"w": np.ones((100, 100), np.float32)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        io.load_state_dict(tmp_path / "cut.safetensors")


def test_bare_npy_under_npz_name_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.ones(3))
    with pytest.raises(ValueError, match=r"x\.npz: not a readable .npz file \(not an .npz archive"):
        io.load_state_dict(path)


def test_non_state_dict_content_is_refused(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        io.load_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="'step' is a int"):
        io.load_state_dict(tmp_path / "mixed.pt")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unsupported file type '.pkl'"):
        io.load_state_dict(tmp_path / "model.pkl")
    with pytest.raises(ValueError, match="unsupported file type"):
        io.save_state_dict({"w": np.ones(2)}, tmp_path / "model.txt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        io.load_state_dict(tmp_path / "missing.pt")


def test_save_rejects_bad_states_and_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match="mapping"):
        io.save_state_dict([np.ones(2)], tmp_path / "m.npz")
    with pytest.raises(TypeError, match="keys must be strings"):
        io.save_state_dict({1: np.ones(2)}, tmp_path / "m.npz")
    with pytest.raises(TypeError, match=r"state\['w'\] is a list"):
        io.save_state_dict({"w": [1.0, 2.0]}, tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "agg.npz"
    io.save_state_dict({"w": np.zeros(3)}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_state_dict({"w": np.ones(3)}, path)
    monkeypatch.undo()
    np.testing.assert_array_equal(io.load_state_dict(path)["w"], np.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agg.npz"]


def test_npz_written_by_save_is_a_plain_numpy_archive(tmp_path):
    io.save_state_dict({"a.b": np.arange(4)}, tmp_path / "m.npz")
    with zipfile.ZipFile(tmp_path / "m.npz") as zf:
        assert zf.namelist() == ["a.b.npy"]
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["a.b"], np.arange(4))

