"""Caption encoders: the three-letter (trigram) count encoding and its sparse batch form.

A caption is lower-cased, reduced to the letters a-z, and every window of three
consecutive letters is counted into one of 26**3 = 17,576 slots. Spaces are
removed before the windows are taken, so windows cross word boundaries
("a cat" -> "aca", "cat"). Accented letters are reduced to their base letter
first ("cafe" and "café" encode the same).

The vector is sparse (a 60-letter caption touches at most 58 slots), so it is
kept as (slot ids, counts) pairs. A batch is a `CaptionBatch` in the layout that
`torch.nn.EmbeddingBag` takes: `EmbeddingBag(mode="sum")` with the counts as
`per_sample_weights` computes exactly what a bias-free linear layer computes on
the dense count vector, without building a (batch, 17576) tensor.
"""

from __future__ import annotations

import unicodedata
from typing import NamedTuple, Sequence

import numpy as np
import torch

ALPHABET_SIZE = 26
TRIGRAM_DIM = ALPHABET_SIZE**3  # 17,576 slots, one per three-letter window


def normalize_caption(text: str) -> str:
    """Lower-case `text`, reduce accented letters to a-z and drop every other character."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(char for char in decomposed if "a" <= char <= "z")


def encode_trigrams(text: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Encode one caption as sparse trigram counts.

    Args:
        text: the caption. None, an empty string or a caption with fewer than
            three letters encodes to no slots, the same as a zero vector.

    Returns:
        (ids, counts): sorted unique slot ids (int64, each in [0, 17576)) and how
        often each window occurs (float32), of equal length.
    """
    letters = normalize_caption(text or "")
    if len(letters) < 3:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)

    codes = np.frombuffer(letters.encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("a")
    windows = (codes[:-2] * ALPHABET_SIZE + codes[1:-1]) * ALPHABET_SIZE + codes[2:]
    ids, counts = np.unique(windows, return_counts=True)
    return ids, counts.astype(np.float32)


def trigram_id(trigram: str) -> int:
    """Return the slot of a three-letter string such as "cat"."""
    if len(trigram) != 3 or not all("a" <= char <= "z" for char in trigram):
        raise ValueError(f"invalid trigram {trigram!r}: expected three letters a-z")
    first, second, third = (ord(char) - ord("a") for char in trigram)
    return (first * ALPHABET_SIZE + second) * ALPHABET_SIZE + third


def encode_dense(text: str | None) -> torch.Tensor:
    """Encode one caption as the dense (17576,) float count vector."""
    ids, counts = encode_trigrams(text)
    vector = torch.zeros(TRIGRAM_DIM)
    vector[torch.from_numpy(ids)] = torch.from_numpy(counts)
    return vector


class CaptionBatch(NamedTuple):
    """A batch of encoded captions in `torch.nn.EmbeddingBag` input layout.

    Caption i owns `ids[offsets[i]:offsets[i + 1]]` and the matching `counts`.
    An empty caption owns no entries and encodes to zeros.
    """

    ids: torch.Tensor  # (total_entries,) int64 slot ids
    offsets: torch.Tensor  # (batch,) int64 start of each caption in ids
    counts: torch.Tensor  # (total_entries,) float32 window counts

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CaptionBatch":
        return CaptionBatch(*(tensor.to(device, non_blocking=non_blocking) for tensor in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.offsets.numel()

    def to_dense(self) -> torch.Tensor:
        """Return the (batch, 17576) count matrix; for tests and small batches only."""
        dense = torch.zeros(len(self), TRIGRAM_DIM, device=self.ids.device)
        lengths = torch.diff(self.offsets, append=torch.tensor([self.ids.numel()], device=self.ids.device))
        rows = torch.repeat_interleave(torch.arange(len(self), device=self.ids.device), lengths)
        dense[rows, self.ids] = self.counts
        return dense


def collate_captions(encoded: Sequence[tuple[np.ndarray, np.ndarray]]) -> CaptionBatch:
    """Join per-caption (ids, counts) pairs from `encode_trigrams` into one `CaptionBatch`."""
    lengths = [len(ids) for ids, _ in encoded]
    offsets = np.zeros(len(encoded), dtype=np.int64)
    if encoded:
        offsets[1:] = np.cumsum(lengths)[:-1]
    ids = np.concatenate([ids for ids, _ in encoded]) if encoded else np.zeros(0, dtype=np.int64)
    counts = np.concatenate([counts for _, counts in encoded]) if encoded else np.zeros(0, dtype=np.float32)
    return CaptionBatch(torch.from_numpy(ids), torch.from_numpy(offsets), torch.from_numpy(counts))


def encode_batch(captions: Sequence[str | None]) -> CaptionBatch:
    """Encode a list of captions into one `CaptionBatch`."""
    return collate_captions([encode_trigrams(caption) for caption in captions])
