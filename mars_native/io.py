"""Safe loading and saving of model state_dicts (client uploads, the aggregated model).

Formats, chosen by the file extension:

- ``.safetensors`` — via the ``safetensors`` package (extra ``io``): a plain tensor container, no
  code. bfloat16 tensors are returned as float32 (NumPy has no bfloat16).
- ``.pt`` / ``.pth`` — via ``torch.load(path, map_location="cpu", weights_only=True)`` (extra
  ``torch``): the restricted unpickler that only rebuilds tensors and plain containers. A file
  whose pickle would run any other code (a crafted upload) is refused with ``ValueError``;
  nothing in it is executed. A checkpoint that wraps the weights as ``{"state_dict": ...}`` or
  ``{"model": ...}`` is unwrapped. Tensors are returned as NumPy arrays sharing their memory
  (bfloat16/float16 become float32).
- ``.npz`` — via ``numpy.load(path, allow_pickle=False)``: object arrays (which need pickle) are
  refused with ``ValueError``.

Plain pickle is never used. Unknown extensions raise ``ValueError``; a missing file raises
``FileNotFoundError``; a corrupt file raises ``ValueError`` naming it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mars_native._arrays import is_torch_tensor, to_numpy

__all__ = ["SUFFIXES", "file_format", "load_state_dict", "save_state_dict"]

#: the supported file extensions
SUFFIXES = (".safetensors", ".pt", ".pth", ".npz")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def file_format(path: str | os.PathLike) -> str:
    """The (lower-case) extension of ``path`` that selects its format; ``ValueError`` when it is
    not one of :data:`SUFFIXES`."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{os.fspath(path)}: unsupported file type {suffix or '(no extension)'!r}; "
                         f"expected one of {', '.join(SUFFIXES)}")
    return suffix


def _import_safetensors() -> Any:
    try:
        import safetensors.numpy as st
    except ImportError as exc:
        raise ImportError("reading/writing .safetensors files needs the safetensors package: "
                          "pip install 'mars-native[io]' (or pip install safetensors)") from exc
    return st


def _import_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"{path}: .pt/.pth files need PyTorch: pip install 'mars-native[torch]' "
                          "(or store the model as .safetensors / .npz)") from exc
    return torch


def _check_state(state: Any, path: str) -> dict[str, np.ndarray]:
    """A loaded object as ``{str: ndarray}``; ValueError for anything that is not a state_dict."""
    if not isinstance(state, Mapping):
        raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
            f"{path}: expected a state_dict (a mapping of name -> tensor), "
                         f"found {type(state).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state_dict keys must be strings, found {key!r}")  # noqa: TRY004
        if is_torch_tensor(value):
            out[key] = to_numpy(value, name=key)
        elif isinstance(value, np.ndarray):
            out[key] = value
        else:
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return out


def _unwrap(obj: Any) -> Any:
    """``{"state_dict": sd, ...}`` / ``{"model": sd, ...}`` -> ``sd`` (one level)."""
    if isinstance(obj, Mapping) and not any(is_torch_tensor(v) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def _unpickler_detail(message: str) -> str:
    """The one informative sentence of torch's weights_only error (its text is long)."""
    marker = "WeightsUnpickler error:"
    tail = message.split(marker, 1)[1] if marker in message else message
    tail = tail.split("Check the documentation", 1)[0]
    words = " ".join(tail.split())
    sentence = words.split(". ", 1)[0].strip()
    return sentence or "the restricted unpickler refused the file"


def _load_torch(path: str) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not errors here
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "global" in detail.lower() or "reduce" in detail.lower():
            raise ValueError(f"{path}: refused: loading it would need pickle code execution, which "
                             f"is never done for untrusted files ({detail})") from exc
        raise ValueError(f"{path}: not a readable PyTorch weights file ({detail})") from exc
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt zip, truncated file, bad magic number, ...
        raise ValueError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from exc
    return _check_state(_unwrap(obj), path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    st = _import_safetensors()
    try:
        return dict(st.load_file(path))
    except FileNotFoundError:
        raise
    except TypeError:
        # a dtype NumPy lacks (bfloat16, float8): read through torch, converted to float32
        try:
            import safetensors.torch as stt
        except ImportError as exc:
            raise ValueError(f"{path}: holds a dtype NumPy cannot represent (e.g. bfloat16); "
                             "install torch to read it") from exc
        return _check_state({k: v.float() if v.is_floating_point() else v
                             for k, v in stt.load_file(path).items()}, path)
    except Exception as exc:  # SafetensorError for a bad header, OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def _load_npz(path: str) -> dict[str, np.ndarray]:
    refused = (f"{path}: refused: it holds pickled data or object arrays, which would need pickle "
               "code execution to load")
    # The file is opened here (not by np.load) so that it is closed on every error path.
    with open(path, "rb") as fh:
        try:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
                raise ValueError("not an .npz archive (a single .npy array?)")  # noqa: TRY004
            with npz:
                return {key: npz[key] for key in npz.files}
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise ValueError(refused) from exc
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a model's state_dict from ``path`` without executing any code from the file.

    Args:
        path: a ``.safetensors``, ``.pt``/``.pth`` or ``.npz`` file.

    Returns:
        ``{name: ndarray}`` in the file's order (safetensors files store names sorted).

    Raises:
        ValueError: unsupported extension, corrupt file, a file that would need pickle code
            execution, or content that is not a state_dict. FileNotFoundError: no such file.
            ImportError: the format's package is not installed (the message names the extra).
    """
    path_str = os.fspath(path)
    suffix = file_format(path_str)
    if not os.path.exists(path_str):
        raise FileNotFoundError(f"{path_str}: no such file")
    if suffix == ".safetensors":
        return _load_safetensors(path_str)
    if suffix == ".npz":
        return _load_npz(path_str)
    return _load_torch(path_str)


def _write_npz(arrays: Mapping[str, np.ndarray], path: str) -> None:
    # np.savez takes names as keyword arguments, which breaks on names like "file"; this writes
    # the same archive layout directly.
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def _plain(x: Any, key: str) -> np.ndarray:
    """A C-contiguous, native-byte-order NumPy array of a tensor."""
    arr = to_numpy(x, name=key)
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")  # 0-d stays 0-d


def save_state_dict(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` (NumPy arrays or torch tensors) to ``path``, atomically.

    The format follows the extension (``.safetensors``, ``.npz``, ``.pt``/``.pth``). The file is
    written to a temporary name in the same directory and renamed, so a reader never sees half a
    file. safetensors and npz store NumPy dtypes (a bfloat16 tensor is stored as float32); ``.pt``
    keeps torch tensors as they are.

    Raises:
        ValueError: unsupported extension. TypeError: non-string keys or non-tensor values.
        ImportError: the format's package is not installed.
    """
    path_str = os.fspath(path)
    suffix = file_format(path_str)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of name -> tensor, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r}")
        if not (isinstance(value, (np.ndarray, np.generic)) or is_torch_tensor(value)):
            raise TypeError(f"state[{key!r}] is a {type(value).__name__}, not an array or tensor")
    directory = os.path.dirname(os.path.abspath(path_str))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        if suffix in (".pt", ".pth"):
            torch = _import_torch(path_str)
            torch.save({k: v.detach().cpu() if is_torch_tensor(v) else torch.from_numpy(_plain(v, k))
                        for k, v in state.items()}, tmp)
        elif suffix == ".npz":
            _write_npz({k: _plain(v, k) for k, v in state.items()}, tmp)
        else:
            _import_safetensors().save_file({k: _plain(v, k) for k, v in state.items()}, tmp)
        os.replace(tmp, path_str)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
