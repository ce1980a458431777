"""A Hugging Face checkpoint folder on disk: ``config.json`` and safetensors weights.

Reads only the tensors asked for (a sharded checkpoint's ``model.safetensors.index.json`` says
which file holds each), with the ``safetensors`` package's numpy API; the dtypes numpy lacks
(bfloat16, float8) are read from the file's own header and data offsets as ``ml_dtypes`` arrays.
Quantized forms are dequantized here, by name: MXFP4 (``<name>_blocks`` + ``<name>_scales``,
GPT-OSS) and block-scaled FP8 (``<name>`` float8 + ``<name>_scale_inv``, DeepSeek-V3).
Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import struct

import ml_dtypes
import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# safetensors dtype names numpy's API cannot give (numpy has no such dtype)
RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
              "F16": np.float16}
NUMPY_TO_SAFETENSORS = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
                        np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}

# MXFP4's e2m1 values by 4-bit code (OCP microscaling; the order transformers' integrations/mxfp4.py uses)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


class CheckpointError(ValueError):
    """A checkpoint jmoe.hf cannot read as asked: the message names the tensor, layer or file."""


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("jmoe.hf reads safetensors files: pip install 'jmoe[hf]' (or pip install safetensors)") \
            from error
    return safe_open


def looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)) and not path.startswith((".", "/", "~"))


def checkpoint_dir(path) -> pathlib.Path:
    """``path`` as an existing folder with a config.json, else a clear error (a hub id is not
    downloaded: the error says to download it first)."""
    text = os.fspath(path)
    folder = pathlib.Path(text).expanduser()
    if not folder.exists():
        if looks_like_hub_id(text):
            raise CheckpointError(
                f"{text!r} is not a folder here; it looks like a Hugging Face hub id. jmoe.hf reads local checkpoint "
                f"folders and downloads nothing: download it first (e.g. `hf download {text} --local-dir DIR`, or "
                f"huggingface_hub.snapshot_download({text!r})) and pass that folder")
        raise CheckpointError(f"checkpoint folder {text!r} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{text!r} is a file: give the checkpoint folder (with config.json and the weights)")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{text!r} has no config.json: give a Hugging Face checkpoint folder")
    return folder


def read_config(folder: pathlib.Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def weight_map(folder: pathlib.Path) -> dict[str, str]:
    """Tensor name -> the file (relative to the folder) that holds it."""
    if (folder / INDEX).exists():
        return dict(json.loads((folder / INDEX).read_text())["weight_map"])
    if (folder / SINGLE).exists():
        safe_open = _safetensors()
        with safe_open(folder / SINGLE, framework="np") as f:
            return {name: SINGLE for name in f.keys()}
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{folder} has safetensors files {found} but neither {SINGLE} nor {INDEX}")
    raise CheckpointError(f"{folder} has no {SINGLE} or {INDEX} (jmoe.hf reads safetensors weights only; "
                          f"pytorch_model.bin checkpoints: convert them first)")


def header(file: pathlib.Path) -> tuple[dict, int]:
    """The safetensors header (name -> dtype, shape, data_offsets) and where the data starts."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def read_raw(file: pathlib.Path, name: str) -> np.ndarray:
    """One tensor of a dtype numpy's safetensors API cannot give, from the file's offsets."""
    meta, start = header(file)
    entry = meta[name]
    dtype = RAW_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    with open(file, "rb") as f:
        f.seek(start + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, dtype=dtype).reshape(entry["shape"]).copy()


class Checkpoint:
    """The folder's tensors by name, read lazily, one file opened at a time."""

    def __init__(self, folder: pathlib.Path, config: dict | None = None):
        self.folder = folder
        self.files = weight_map(folder)
        quant = (config or {}).get("quantization_config") or (config or {}).get("text_config", {}).get(
            "quantization_config") or {}
        self.fp8_block = tuple(quant.get("weight_block_size") or (128, 128))  # DeepSeek-V3's FP8 blocks

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        safe_open = _safetensors()
        with safe_open(self.folder / self.files[name], framework="np") as f:
            return tuple(f.get_slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        safe_open = _safetensors()
        with safe_open(self.folder / self.files[name], framework="np") as f:
            return f.get_slice(name).get_dtype()

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored."""
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint {self.folder}")
        file = self.folder / self.files[name]
        safe_open = _safetensors()
        with safe_open(file, framework="np") as f:
            if f.get_slice(name).get_dtype() in RAW_DTYPES:
                return read_raw(file, name)
            return f.get_tensor(name)

    def float32(self, name: str) -> np.ndarray:
        """The tensor in float32, dequantized when the checkpoint holds it quantized (MXFP4
        ``_blocks``/``_scales``; FP8 with ``_scale_inv``); a missing tensor is a clear error."""
        if name not in self.files and f"{name}_blocks" in self.files:
            return dequantize_mxfp4(self.raw(f"{name}_blocks"), self.raw(f"{name}_scales"))
        value = self.raw(name).astype(np.float32)
        if f"{name}_scale_inv" in self.files:
            value = dequantize_fp8(value, self.raw(f"{name}_scale_inv").astype(np.float32), name, self.fp8_block)
        return value

    def quantization(self, name: str) -> str | None:
        if name not in self.files and f"{name}_blocks" in self.files:
            return "mxfp4"
        if f"{name}_scale_inv" in self.files:
            return "fp8"
        return None


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 ``blocks [..., rows, G, 16]`` uint8 (two e2m1 codes a byte, low nibble first) and
    ``scales [..., rows, G]`` uint8 (exponent + 127) -> float32 ``[..., G * 32, rows]``: the
    blocks run along the input dim, and the result is transposed to GPT-OSS's ``x @ W`` layout
    (transformers' ``convert_moe_packed_tensors``)."""
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    low, high = FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]  # [..., rows, G, 16] each
    values = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)  # [..., rows, G, 32]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    values = values.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2)  # [..., rows, cols]
    return np.swapaxes(values, -1, -2).astype(np.float32)


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, name: str, block=(128, 128)) -> np.ndarray:
    """Block-scaled FP8 (DeepSeek-V3): ``weight [out, in] * scale_inv`` per ``block`` (the config's
    ``quantization_config.weight_block_size``, 128 x 128 in DeepSeek's checkpoints; the last
    block of a dim may be partial)."""
    rows, cols = weight.shape[-2:]
    block_r, block_c = (int(b) for b in block)
    if scale_inv.shape[-2:] != (math.ceil(rows / block_r), math.ceil(cols / block_c)):
        raise CheckpointError(f"{name}: weight {tuple(weight.shape)} in blocks of {block_r} x {block_c} needs "
                              f"weight_scale_inv of shape {(math.ceil(rows / block_r), math.ceil(cols / block_c))}, "
                              f"the checkpoint has {tuple(scale_inv.shape)}")
    scale = np.repeat(np.repeat(scale_inv, block_r, axis=-2), block_c, axis=-1)[..., :rows, :cols]
    return weight * scale


def hub_array(value) -> np.ndarray:
    """A weight as the hub stores it from jmoe: float32, or an integer table (DeepSeek-V4's
    ``tid2eid``) as it is."""
    value = np.asarray(value)
    return np.ascontiguousarray(value if np.issubdtype(value.dtype, np.integer) else value.astype(np.float32))


def write_tensors(folder: pathlib.Path, tensors: dict[str, np.ndarray]) -> list[str]:
    """Put ``tensors`` (float32 or integer tables, by hub name) into the checkpoint in ``folder``:
    each replaces the stored tensor of that name in the file that holds it, keeping its stored
    dtype (a bfloat16 checkpoint stays bfloat16), the rest of that file unchanged. A folder
    without weights gets a new ``model.safetensors`` of float32 tensors (integer tables as they
    are). Returns the files written."""
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SINGLE).exists() and not (folder / INDEX).exists():
        save_file({n: hub_array(v) for n, v in tensors.items()}, folder / SINGLE, metadata={"format": "pt"})
        return [SINGLE]
    checkpoint = Checkpoint(folder)
    missing = [n for n in tensors if n not in checkpoint]
    if missing:
        raise CheckpointError(f"the checkpoint in {folder} has no tensor {missing[0]!r} to replace "
                              f"({len(missing)} missing): is it this family's checkpoint, and this layer?")
    by_file: dict[str, list[str]] = {}
    for name in tensors:
        by_file.setdefault(checkpoint.files[name], []).append(name)
    for file, names in by_file.items():
        path = folder / file
        meta, _ = header(path)
        stored = {n: checkpoint.raw(n) for n in meta if n != "__metadata__"}
        for name in names:
            if stored[name].shape != tensors[name].shape:
                raise CheckpointError(f"{name}: the layer gives shape {tuple(tensors[name].shape)}, the checkpoint "
                                      f"holds {tuple(stored[name].shape)}")
            stored[name] = np.asarray(tensors[name]).astype(stored[name].dtype)
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: np.ascontiguousarray(v) for n, v in stored.items()}, tmp,
                  metadata=meta.get("__metadata__") or {"format": "pt"})
        os.replace(tmp, path)
    return sorted(by_file)
