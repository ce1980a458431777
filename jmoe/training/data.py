"""Byte-level text data: vocabulary 256, no download, no tokenizer.

Corpus: every ``*.py`` file of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without site-/dist-packages), or the text
files under ``data=PATH`` (a file or a directory; files with a NUL byte in their
first 8 KiB are skipped as binary; only regular files are read: a FIFO, socket or
device in the directory is skipped, it could block forever). Files are read in sorted
path order.

Validation split, fixed and deterministic, by whole files: a file is held out iff
``crc32(relative path) % 10000 < val_percent * 100``. A single file, and a directory
whose file split would leave either side with fewer than ``min_bytes`` bytes (a folder of
a few books: with 3 files at 5%, most often no file is held out), is split by bytes
instead, within each file: a file of n bytes gives its last ``floor(n * val_percent / 100)``
bytes to validation and the rest to training. Either way no byte is in both splits: a
held-out file is wholly validation, a byte-split file's tail is validation and its head
training. ``Corpus.split`` says which rule was used (``"files"`` or ``"bytes"``).

Training batches: batch ``i`` is ``batch_size`` windows of ``seq_len + 1``
bytes whose starts are drawn by ``numpy.random.default_rng([seed, i])``; they
depend only on ``(seed, i)``, so a resumed run sees exactly the batches an
uninterrupted run would. With P processes, process p reads only rows
``[p * B / P, (p + 1) * B / P)`` of every batch. Validation batches are fixed,
evenly spaced windows of the validation split.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sysconfig
import zlib

import numpy as np

VOCAB_SIZE = 256
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The two splits as uint8 byte arrays and where they came from."""

    train: np.ndarray  # [N_train] uint8
    val: np.ndarray  # [N_val] uint8
    source: str
    num_files: int
    split: str = "files"  # "files": whole files held out; "bytes": each file's tail held out


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_regular_file(path: str) -> bool:
    """A regular file (after symlinks); not a FIFO, socket or device, whose reads can block forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def list_files(root: str, pattern_ext: str | None) -> list[str]:
    """Sorted relative paths of the regular files under ``root`` (ending in ``pattern_ext`` when given)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if (pattern_ext is None or name.endswith(pattern_ext)) and is_regular_file(os.path.join(dirpath, name)):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def is_validation_file(relpath: str, val_percent: float) -> bool:
    """``crc32(relpath) % 10000 < val_percent * 100``: fixed for a path, whatever the machine."""
    return zlib.crc32(relpath.replace(os.sep, "/").encode()) % 10000 < round(val_percent * 100)


def _read(path: str, skip_binary: bool) -> bytes | None:
    with open(path, "rb") as fh:
        data = fh.read()
    if skip_binary and b"\0" in data[:8192]:
        return None
    return data


def load_corpus(path: str = "", val_percent: float = 5.0, min_bytes: int = 1) -> Corpus:
    """Read the corpus and split it; see the module docstring.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: no text found, or a split with fewer than ``min_bytes`` bytes
        (train.py asks for ``seq_len + 2``: one window).
    """
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data path {path!r} does not exist (give a text file or a directory of text files)")
        if not (os.path.isdir(path) or is_regular_file(path)):
            raise ValueError(f"data path {path!r} is neither a regular file nor a directory (a FIFO, socket or "
                             f"device is not read: it could block forever)")
        if os.path.isfile(path):
            corpus = split_by_bytes([_read(path, skip_binary=False)], val_percent, path)
            require_bytes(corpus, min_bytes)
            return corpus
        root, ext, skip_binary = path, None, True
    else:
        root, ext, skip_binary = stdlib_dir(), ".py", False
    files = {}  # relative path -> bytes, in sorted path order
    for rel in list_files(root, ext):
        try:
            data = _read(os.path.join(root, rel), skip_binary)
        except OSError:
            continue
        if data:
            files[rel] = data
    val = [data for rel, data in files.items() if is_validation_file(rel, val_percent)]
    train = [data for rel, data in files.items() if not is_validation_file(rel, val_percent)]
    corpus = Corpus(_join(train), _join(val), root, len(files))
    if files and min(len(corpus.train), len(corpus.val)) < min_bytes:  # too few files to split by file
        corpus = split_by_bytes(list(files.values()), val_percent, root)
    require_bytes(corpus, min_bytes)
    return corpus


def _join(pieces: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"\n".join(pieces), np.uint8)


def split_by_bytes(files: list[bytes], val_percent: float, source: str) -> Corpus:
    """Each file's last ``floor(n * val_percent / 100)`` of its n bytes -> validation, the rest ->
    training (files joined by a newline on each side)."""
    cuts = [len(data) - int(len(data) * val_percent / 100) for data in files]
    return Corpus(_join([data[:cut] for data, cut in zip(files, cuts)]),
                  _join([data[cut:] for data, cut in zip(files, cuts) if cut < len(data)]), source, len(files), "bytes")


def require_bytes(corpus: Corpus, min_bytes: int) -> None:
    """Both splits must hold at least ``min_bytes`` bytes (else a ValueError saying which)."""
    if corpus.num_files == 0:
        raise ValueError(f"no text files found under {corpus.source!r}")
    for name in ("train", "val"):
        n = len(getattr(corpus, name))
        if n < min_bytes:
            raise ValueError(
                f"the {name} split of {corpus.source!r} has {n} bytes, fewer than {min_bytes}: "
                f"give more text or change val_percent"
            )


def window_starts(seed: int, index: int, batch_size: int, num_bytes: int, seq_len: int) -> np.ndarray:
    """Starts of batch ``index``'s windows: ``default_rng([seed, index]).integers(0, N - S, B)`` [B] int64."""
    high = num_bytes - seq_len  # a window is seq_len + 1 bytes: start <= N - S - 1
    if high < 1:
        raise ValueError(f"the split has {num_bytes} bytes, too few for seq_len={seq_len}")
    return np.random.default_rng([seed, index]).integers(0, high, size=batch_size)


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-byte targets of the windows at ``starts``: two [len(starts), seq_len] int32."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # [B, S + 1]
    w = data[idx].astype(np.int32)
    return w[:, :-1], w[:, 1:]


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that process ``process_index`` loads."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by the process count {process_count}")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def train_batch(data: np.ndarray, seed: int, index: int, batch_size: int, seq_len: int,
                process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of training batch ``index``: (inputs, targets) [B / P, S] int32."""
    starts = window_starts(seed, index, batch_size, len(data), seq_len)  # [B]
    return windows(data, starts[process_rows(batch_size, process_index, process_count)], seq_len)


def val_batch(data: np.ndarray, index: int, num_batches: int, batch_size: int, seq_len: int,
              process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of validation batch ``index`` of ``num_batches``: evenly spaced windows,
    ``start_j = floor(j * (N - S - 1) / (num_batches * B - 1))`` for j over all windows."""
    total = num_batches * batch_size
    high = len(data) - seq_len - 1
    if high < 0:
        raise ValueError(f"the validation split has {len(data)} bytes, too few for seq_len={seq_len}")
    starts = (np.arange(total, dtype=np.int64) * high) // max(total - 1, 1)  # [num_batches * B]
    starts = starts[index * batch_size:(index + 1) * batch_size]
    return windows(data, starts[process_rows(batch_size, process_index, process_count)], seq_len)


def decode(tokens) -> str:
    """Bytes -> text (invalid UTF-8 replaced)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
