"""Decoded-image cache: every image decoded, converted to RGB and resized once, then read from memory.

One cache serves one image folder at one input size. It lives in
`<runs_dir>/.cache/images/<folder hash>-<size>px/` as two files:

- `images.u8`: a raw uint8 array of shape (slots, 3, size, size), read through `numpy.memmap`.
- `index.json`: for each image (path relative to the folder), its slot and the file's
  size, modification time and status change time when it was decoded.

An image whose size or either time changed since is decoded again into its slot,
and a new image gets a new slot, so later runs at the same size decode only what
changed. The change time catches a file copied over another with the old size and
modification time kept. A lock file keeps two processes from updating one cache at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from core.datasets import file_stamp, load_resized
from core.runs import read_json, write_json

logger = logging.getLogger(__name__)

CACHE_DIR_NAME = "images"  # under <runs_dir>/.cache
DATA_FILE = "images.u8"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
INDEX_VERSION = 2  # 2 added the status change time to each entry


class ImageCache:
    """Decoded uint8 images of one folder at one square size, stored in a memory-mapped file."""

    def __init__(self, cache_root: str | os.PathLike, image_dir: str | os.PathLike, image_size: int) -> None:
        self.image_dir = Path(image_dir).resolve()
        self.image_size = int(image_size)
        digest = hashlib.sha1(str(self.image_dir).encode("utf-8")).hexdigest()[:16]
        self.root = Path(cache_root) / f"{digest}-{self.image_size}px"
        self.slot_shape = (3, self.image_size, self.image_size)
        self.slot_bytes = int(np.prod(self.slot_shape))

    def load(self, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        """Return (array, slots): the memory-mapped array and each path's slot in it, in order.

        Images that are new or changed since they were cached are decoded first.

        Raises:
            ValueError: an image cannot be decoded; the message names the file.
            OSError: the disk has no room for the new images, or (PermissionError) the
                cache folder is not writable; the message gives the fix.
        """
        names = [self._relative(path) for path in paths]
        stamps = [file_stamp(path) for path in paths]
        with self._locked():
            return self._load_locked(paths, names, stamps)

    def _load_locked(self, paths: Sequence[Path], names: list[str],
                     stamps: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        index = self._read_index()
        entries: dict[str, list[int]] = index["entries"]
        todo = [position for position, name in enumerate(names) if entries.get(name, [None])[1:] != stamps[position]]
        if todo:
            self._decode_into(index, [paths[position] for position in todo], [names[position] for position in todo],
                              [stamps[position] for position in todo])
        slots = np.array([entries[name][0] for name in names], dtype=np.int64)
        count = index["slots"]
        array = np.memmap(self.root / DATA_FILE, dtype=np.uint8, mode="r", shape=(count, *self.slot_shape))
        logger.info("image cache %s: %d image(s) at %d px for these rows (%s), %d in the cache, %.1f MB",
                    self.root, len(names), self.image_size, f"{len(todo)} decoded now" if todo else "none decoded",
                    count, count * self.slot_bytes / 1e6)
        return array, slots

    def _relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.image_dir).as_posix()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / LOCK_FILE).open("a")
        except PermissionError as error:
            raise PermissionError(f"the image cache {self.root} is not writable ({error.strerror}); make it "
                                  "writable, or pass --no-image-cache (the Image cache box on the Train page)") from error
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process to finish updating the image cache %s", self.root)
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _read_index(self) -> dict:
        path = self.root / INDEX_FILE
        data_file = self.root / DATA_FILE
        empty = {"version": INDEX_VERSION, "image_dir": str(self.image_dir), "image_size": self.image_size,
                 "slots": 0, "entries": {}}
        if not path.is_file():
            return empty
        try:
            index = read_json(path)
            valid = (index.get("version") == INDEX_VERSION and index.get("image_size") == self.image_size
                     and data_file.is_file() and data_file.stat().st_size >= index["slots"] * self.slot_bytes
                     and _valid_entries(index["entries"], index["slots"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            logger.warning("image cache %s is damaged or from another version; decoding its images again", self.root)
            return empty
        return index

    def _allocate(self, data_file: Path, required: int) -> None:
        """Grow `data_file` to `required` bytes of reserved disk space.

        The space is reserved before the pixels are written through the memory map,
        because a full disk would otherwise stop the process with SIGBUS and no message.
        """
        with data_file.open("ab") as handle:
            current = handle.seek(0, os.SEEK_END)
            if current >= required:
                return
            try:
                os.posix_fallocate(handle.fileno(), current, required - current)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                free = shutil.disk_usage(self.root).free
                raise OSError(
                    error.errno,
                    f"not enough disk space for the image cache {self.root}: it needs {(required - current) / 1e6:.0f} "
                    f"MB more and {free / 1e6:.0f} MB are free; free some space, or pass --no-image-cache (the "
                    "Image cache box on the Train page)",
                ) from error

    def _decode_into(self, index: dict, paths: list[Path], names: list[str], stamps: list[list[int]]) -> None:
        entries = index["entries"]
        new = [name for name in names if name not in entries]
        for offset, name in enumerate(new):
            entries[name] = [index["slots"] + offset, -1, -1, -1]  # stamps are filled in once decoded
        index["slots"] += len(new)

        data_file = self.root / DATA_FILE
        self._allocate(data_file, index["slots"] * self.slot_bytes)
        array = np.memmap(data_file, dtype=np.uint8, mode="r+", shape=(index["slots"], *self.slot_shape))
        logger.info("decoding %d image(s) into the image cache %s", len(paths), self.root)

        def decode(position: int) -> None:
            array[entries[names[position]][0]] = load_resized(paths[position], self.image_size).numpy()

        try:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                list(pool.map(decode, range(len(paths))))  # decoding releases the GIL
            array.flush()
        finally:
            del array
        # The index is written only after the pixels are on disk, so a crash leaves stale stamps, not bad pixels.
        for name, stamp in zip(names, stamps):
            entries[name][1:] = stamp
        write_json(self.root / INDEX_FILE, index)


def _valid_entries(entries: object, slots: object) -> bool:
    """Check that every entry is [slot, size, mtime, ctime] with its own slot below `slots`."""
    if not isinstance(entries, dict) or not isinstance(slots, int):
        return False
    used = set()
    for entry in entries.values():
        if not (isinstance(entry, list) and len(entry) == 4 and all(type(value) is int for value in entry)):
            return False
        if not 0 <= entry[0] < slots or entry[0] in used:
            return False
        used.add(entry[0])
    return True
