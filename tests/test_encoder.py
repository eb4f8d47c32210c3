"""Tests for core.encoder: trigram counts, their dense form and the EmbeddingBag batch layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.encoder import (
    TRIGRAM_DIM,
    CaptionBatch,
    collate_captions,
    encode_batch,
    encode_dense,
    encode_trigrams,
    normalize_caption,
    trigram_id,
)

# Slots computed by hand: (first * 26 + second) * 26 + third, with a=0 ... z=25.
CAT = (2 * 26 + 0) * 26 + 19  # "cat" = 1371
ACA = (0 * 26 + 2) * 26 + 0  # "aca" = 52
DOG = (3 * 26 + 14) * 26 + 6  # "dog" = 2398


def test_trigram_dim_value():
    assert TRIGRAM_DIM == 17576


def test_encode_trigrams_single_word():
    ids, counts = encode_trigrams("Cat")
    assert ids.tolist() == [CAT]
    assert counts.tolist() == [1.0]


def test_encode_trigrams_dtypes():
    ids, counts = encode_trigrams("a cat")
    assert ids.dtype == np.int64
    assert counts.dtype == np.float32


def test_encode_trigrams_crosses_word_boundary():
    # Spaces are removed first, so "a cat" becomes "acat" with windows "aca" and "cat".
    ids, counts = encode_trigrams("a cat")
    assert ids.tolist() == [ACA, CAT]
    assert counts.tolist() == [1.0, 1.0]


def test_encode_trigrams_counts_repeated_windows():
    # "aaaa" has two windows, both "aaa" (slot 0).
    ids, counts = encode_trigrams("aaaa")
    assert ids.tolist() == [0]
    assert counts.tolist() == [2.0]


def test_encode_trigrams_ids_sorted_unique():
    # "catdogcat" has seven windows and "cat" is two of them.
    ids, counts = encode_trigrams("cat dog cat")
    assert ids.tolist() == sorted(set(ids.tolist()))
    assert counts[ids.tolist().index(CAT)] == 2.0
    assert counts[ids.tolist().index(DOG)] == 1.0
    assert counts.sum() == len("catdogcat") - 2


def test_encode_trigrams_drops_punctuation_digits():
    ids, counts = encode_trigrams("c4a-t!")
    assert ids.tolist() == [CAT]
    assert counts.tolist() == [1.0]


def test_encode_trigrams_reduces_accents():
    plain_ids, plain_counts = encode_trigrams("cafe")
    for accented in ("café", "CAFÉ", "cafe\u0301"):
        ids, counts = encode_trigrams(accented)
        assert ids.tolist() == plain_ids.tolist(), accented
        assert counts.tolist() == plain_counts.tolist(), accented


def test_normalize_caption_keeps_only_letters():
    assert normalize_caption("A Ñandú, 2 cats!") == "ananducats"


@pytest.mark.parametrize("text", [None, "", "ab", "a b", "12 !?", "猫が"])
def test_encode_trigrams_short_input_empty(text):
    ids, counts = encode_trigrams(text)
    assert ids.shape == (0,)
    assert counts.shape == (0,)
    assert ids.dtype == np.int64
    assert counts.dtype == np.float32


def test_trigram_id_hand_values():
    assert trigram_id("aaa") == 0
    assert trigram_id("aab") == 1
    assert trigram_id("baa") == 26 * 26
    assert trigram_id("cat") == CAT
    assert trigram_id("zzz") == TRIGRAM_DIM - 1


def test_trigram_id_matches_encoder():
    ids, _ = encode_trigrams("dog")
    assert ids.tolist() == [trigram_id("dog")]


@pytest.mark.parametrize("bad", ["", "ca", "cats", "caT", "c4t", "c t", "afé"])
def test_trigram_id_invalid_raises(bad):
    with pytest.raises(ValueError, match="invalid trigram"):
        trigram_id(bad)


@pytest.mark.parametrize("text", ["a cat", "aaaa", "The dog chased the cat, twice.", None, ""])
def test_encode_dense_equals_sparse(text):
    ids, counts = encode_trigrams(text)
    dense = encode_dense(text)
    assert dense.shape == (TRIGRAM_DIM,)
    assert dense.dtype == torch.float32
    assert torch.equal(dense[torch.from_numpy(ids)], torch.from_numpy(counts))
    assert int((dense != 0).sum()) == len(ids)
    assert float(dense.sum()) == float(counts.sum())


def test_encode_batch_offsets_empty_middle():
    batch = encode_batch(["a cat", "", "aaaa"])
    assert batch.ids.tolist() == [ACA, CAT, 0]
    assert batch.offsets.tolist() == [0, 2, 2]
    assert batch.counts.tolist() == [1.0, 1.0, 2.0]
    assert len(batch) == 3


def test_collate_captions_matches_encode_batch():
    captions = ["dog", None, "a cat", "x"]
    collated = collate_captions([encode_trigrams(caption) for caption in captions])
    batch = encode_batch(captions)
    assert torch.equal(collated.ids, batch.ids)
    assert torch.equal(collated.offsets, batch.offsets)
    assert torch.equal(collated.counts, batch.counts)


def test_collate_captions_tensor_dtypes():
    batch = encode_batch(["a cat", ""])
    assert batch.ids.dtype == torch.int64
    assert batch.offsets.dtype == torch.int64
    assert batch.counts.dtype == torch.float32


def test_encode_batch_empty_list():
    batch = encode_batch([])
    assert len(batch) == 0
    assert batch.ids.numel() == 0
    assert batch.to_dense().shape == (0, TRIGRAM_DIM)


@pytest.mark.parametrize(
    "captions",
    [["a cat", "", "aaaa"], ["", "dog", ""], ["", ""], ["The dog chased the cat."]],
)
def test_caption_batch_to_dense_equals_stacked(captions):
    dense = encode_batch(captions).to_dense()
    expected = torch.stack([encode_dense(caption) for caption in captions])
    assert dense.shape == (len(captions), TRIGRAM_DIM)
    assert torch.equal(dense, expected)


def test_caption_batch_to_cpu_keeps_values():
    batch = encode_batch(["a cat", "", "dog"])
    moved = batch.to("cpu")
    assert isinstance(moved, CaptionBatch)
    assert torch.equal(moved.ids, batch.ids)
    assert torch.equal(moved.offsets, batch.offsets)
    assert torch.equal(moved.counts, batch.counts)


@pytest.mark.parametrize(
    "captions",
    [
        ["a cat", "", "aaaa"],
        ["", "A dog chased a cat, then a dog chased it back.", ""],
        ["Woman in swim suit holding parasol on sunny day."],
    ],
)
def test_embedding_bag_equals_dense_matmul(captions):
    # The model relies on EmbeddingBag(sum, per_sample_weights=counts) == dense counts @ weight.
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(TRIGRAM_DIM, 5, mode="sum")
    batch = encode_batch(captions)
    with torch.no_grad():
        sparse_out = bag(batch.ids, batch.offsets, per_sample_weights=batch.counts)
        dense_out = batch.to_dense() @ bag.weight
    assert sparse_out.shape == (len(captions), 5)
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-5, atol=1e-5)


def test_embedding_bag_empty_caption_zeros():
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(TRIGRAM_DIM, 4, mode="sum")
    batch = encode_batch(["dog", "", "ab", "cat"])
    with torch.no_grad():
        out = bag(batch.ids, batch.offsets, per_sample_weights=batch.counts)
    assert torch.equal(out[1], torch.zeros(4))
    assert torch.equal(out[2], torch.zeros(4))
    assert bool(out[0].abs().sum() > 0)
    assert bool(out[3].abs().sum() > 0)
