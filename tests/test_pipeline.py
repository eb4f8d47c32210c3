"""The fast training pipeline: image cache, batched augmentation, feature cache, precision switches."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core import datasets, trainer
from core.datasets import BatchAugment, CaptionedImages, collate_rows
from core.demo import make_demo
from core.imagecache import ImageCache
from core.runs import read_progress
from core.encoder import encode_trigrams
from core.trainer import FeatureRows, InputPipeline, TrainConfig, _loaders, autocast_dtype, train


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Twelve noisy RGB photos of different sizes in a data/ folder."""
    folder = tmp_path_factory.mktemp("photos") / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for index in range(12):
        size = (40 + 7 * index, 30 + 5 * index)
        path = folder / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _batches(rows: CaptionedImages, seed: int) -> list[torch.Tensor]:
    """Read all rows in batches of 5 and augment them with a generator seeded with `seed`."""
    augment = BatchAugment([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], ["hflip", "vflip", "jitter", "sharpness"])
    generator = torch.Generator().manual_seed(seed)
    output = []
    for start in range(0, len(rows), 5):
        batch = collate_rows(rows.__getitems__(list(range(start, min(start + 5, len(rows))))))
        output.append(augment(batch[0], generator))
    return output


def test_cached_and_decoded_images_identical(photos, tmp_path):
    targets = np.zeros((len(photos), 2), np.float32)
    captions = [f"photo {index}" for index in range(len(photos))]
    decoded = CaptionedImages(photos, captions, targets, 32, None)
    cached = CaptionedImages(None, captions, targets, 32, None,
                             cached=ImageCache(tmp_path, photos[0].parent, 32).load(photos))
    for index in range(len(photos)):
        assert torch.equal(decoded[index][0], cached[index][0])
    for first, second in zip(_batches(decoded, seed=3), _batches(cached, seed=3)):
        assert torch.equal(first, second)


def test_batch_reads_keep_row_order(photos, tmp_path):
    # Batches read the memory-mapped file in sorted order, then restore the requested order.
    rows = CaptionedImages(None, ["a"] * len(photos), np.zeros((len(photos), 1)), 24, None,
                           cached=ImageCache(tmp_path, photos[0].parent, 24).load(photos))
    requested = [7, 2, 11, 0, 5]
    batch = rows.__getitems__(requested)
    for position, index in enumerate(requested):
        assert torch.equal(batch[position][0], rows[index][0])


def test_image_cache_reused_by_a_second_load(photos, tmp_path, caplog):
    ImageCache(tmp_path, photos[0].parent, 16).load(photos)
    assert f"{len(photos)} decoded now" in caplog.text
    caplog.clear()
    array, slots = ImageCache(tmp_path, photos[0].parent, 16).load(photos)
    assert "decoded now" not in caplog.text
    assert array.shape == (len(photos), 3, 16, 16)
    assert sorted(slots.tolist()) == list(range(len(photos)))


def test_image_cache_redecodes_changed_image(photos, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    paths = []
    for path in photos[:3]:
        paths.append(folder / path.name)
        paths[-1].write_bytes(path.read_bytes())
    cache = ImageCache(tmp_path / "cache", folder, 16)
    before, slots = cache.load(paths)
    old = np.array(before[slots[1]])

    Image.new("RGB", (20, 20), (255, 0, 0)).save(paths[1], format="PNG")  # lossless, so exactly red
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 1_000_000))
    after, new_slots = cache.load(paths)
    assert new_slots.tolist() == slots.tolist()
    assert not np.array_equal(np.array(after[new_slots[1]]), old)
    assert np.array(after[new_slots[1]])[:, 0, 0].tolist() == [255, 0, 0]
    assert np.array_equal(np.array(after[new_slots[0]]), np.array(before[slots[0]]))


def test_image_cache_grows_and_recovers(photos, tmp_path, caplog):
    cache = ImageCache(tmp_path, photos[0].parent, 16)
    cache.load(photos[:4])
    array, slots = cache.load(photos)
    assert array.shape[0] == len(photos)
    (cache.root / "index.json").write_text("{broken")
    array, slots = ImageCache(tmp_path, photos[0].parent, 16).load(photos)
    assert "damaged or from another version" in caplog.text
    assert torch.equal(torch.from_numpy(np.array(array[slots[5]])), datasets.load_resized(photos[5], 16))


def _copies(photos, folder, count=3):
    folder.mkdir()
    paths = []
    for path in photos[:count]:
        paths.append(folder / path.name)
        paths[-1].write_bytes(path.read_bytes())
    return paths


def test_image_cache_redecodes_copy_with_old_times(photos, tmp_path):
    # cp -p, rsync -a and tar keep the size and modification time; the status change time still moves.
    paths = _copies(photos, tmp_path / "data")
    cache = ImageCache(tmp_path / "cache", paths[0].parent, 16)
    cache.load(paths)
    original = paths[1].stat()
    red = Image.new("RGB", (20, 20), (255, 0, 0))
    red.save(paths[1], format="BMP")
    with paths[1].open("r+b") as handle:
        handle.truncate(original.st_size)  # BMP ignores trailing bytes, so the file keeps its old size
    os.utime(paths[1], ns=(original.st_atime_ns, original.st_mtime_ns))
    assert (paths[1].stat().st_size, paths[1].stat().st_mtime_ns) == (original.st_size, original.st_mtime_ns)

    array, slots = cache.load(paths)
    assert np.array(array[slots[1]])[:, 0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda index: index["entries"].update({next(iter(index["entries"])): [999, 1, 1, 1]}),
                 id="slot-out-of-range"),
    pytest.param(lambda index: index.update(entries=list(index["entries"])), id="entries-list"),
    pytest.param(lambda index: index["entries"].update({next(iter(index["entries"])): "x"}), id="entry-string"),
    pytest.param(lambda index: [entry.__setitem__(0, 0) for entry in index["entries"].values()], id="shared-slot"),
])
def test_image_cache_rebuilds_damaged_entries(damage, photos, tmp_path, caplog):
    cache = ImageCache(tmp_path, photos[0].parent, 16)
    cache.load(photos[:4])
    index = json.loads((cache.root / "index.json").read_text())
    damage(index)
    (cache.root / "index.json").write_text(json.dumps(index))

    array, slots = ImageCache(tmp_path, photos[0].parent, 16).load(photos[:4])
    assert "damaged or from another version" in caplog.text
    for position in range(4):
        assert torch.equal(torch.from_numpy(np.array(array[slots[position]])),
                           datasets.load_resized(photos[position], 16))


def test_image_cache_full_disk_named(photos, tmp_path, monkeypatch):
    def no_space(descriptor, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match=r"not enough disk space for the image cache .*-16px: it needs \d+ MB more "
                                      r"and \d+ MB are free; free some space, or pass --no-image-cache"):
        ImageCache(tmp_path, photos[0].parent, 16).load(photos[:2])


def test_image_cache_not_writable_named(photos, tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(PermissionError, match=r"the image cache .*-16px is not writable \(Permission denied\); "
                                              r"make it writable, or pass --no-image-cache"):
        ImageCache(tmp_path, photos[0].parent, 16).load(photos[:2])


def test_image_cache_logs_wait_for_lock(photos, tmp_path, caplog):
    cache = ImageCache(tmp_path, photos[0].parent, 16)
    cache.load(photos[:2])
    caplog.clear()
    with (cache.root / ".lock").open("a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        waiting = threading.Thread(target=cache.load, args=(photos[:2],))
        waiting.start()
        for _ in range(100):
            if "waiting for another process" in caplog.text:
                break
            time.sleep(0.02)
        fcntl.flock(holder, fcntl.LOCK_UN)
    waiting.join(timeout=10)
    assert "waiting for another process to finish updating the image cache" in caplog.text
    assert "2 image(s) at 16 px for these rows (none decoded)" in caplog.text


def test_image_cache_undecodable_file_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"bad\.jpg: not an image file"):
        ImageCache(tmp_path / "cache", folder, 16).load([folder / "bad.jpg"])


def test_batch_augment_without_augmentations_normalises():
    images = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)
    output = BatchAugment([0.2, 0.2, 0.2], [0.5, 0.5, 0.5])(images)
    assert output.dtype == torch.float32
    assert torch.allclose(output, torch.zeros_like(output), atol=1e-6)


def test_batch_augment_flips_some_images():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4).repeat(8, 1, 1, 1)
    output = BatchAugment([0.0] * 3, [1.0] * 3, ["hflip"])(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(output[index], images[index].flip(-1).float() / 255) for index in range(16)]
    kept = [torch.equal(output[index], images[index].float() / 255) for index in range(16)]
    assert any(flipped)
    assert any(kept)
    assert all(first or second for first, second in zip(flipped, kept))


def test_batch_augment_unknown_name():
    with pytest.raises(ValueError, match="unknown augmentation"):
        BatchAugment([0.5] * 3, [0.5] * 3, ["rotate"])


def test_autocast_dtype_follows_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: True)
    assert autocast_dtype(cpu, amp=True) == torch.bfloat16
    assert autocast_dtype(cpu, amp=False) is None
    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: False)
    assert autocast_dtype(cpu, amp=True) is None


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("shapes"), train_rows=200, test_rows=2, image_size=48, seed=5)


def _run(shapes, runs, name, **overrides):
    settings = dict(data=str(shapes), runs_dir=str(runs), model="cnn2", image_size=48, epochs=3, batch_size=16,
                    workers=0, run_name=name, augment=["hflip"])
    settings.update(overrides)
    run_dir = train(TrainConfig(**settings))
    return json.loads((run_dir / "metrics.json").read_text()), json.loads((run_dir / "config.json").read_text())


def test_image_cache_run_matches_decoding_run(shapes, tmp_path, caplog):
    # Same seed, same rows, same augmentations: the cache changes where pixels come from, not the result.
    cached, config = _run(shapes, tmp_path / "runs", "cached")
    decoded, other = _run(shapes, tmp_path / "runs", "decoded", image_cache=False)
    assert config["image_cache_dir"].startswith(str(tmp_path / "runs" / ".cache" / "images"))
    assert other["image_cache_dir"] is None
    assert "image cache off: every image is decoded again in every epoch, in the main process" in caplog.text
    assert cached["samples_f1_score"] == pytest.approx(decoded["samples_f1_score"], abs=1e-6)
    assert cached["val_loss"] == pytest.approx(decoded["val_loss"], rel=1e-4)


def test_channels_last_and_bfloat16_keep_f1(shapes, tmp_path, monkeypatch):
    reference, _ = _run(shapes, tmp_path / "runs", "float32", channels_last=False, amp=False)
    fast, config = _run(shapes, tmp_path / "runs", "channels-last", channels_last=True)
    assert config["channels_last"] is True
    # 40 validation rows: one row more or less right moves samples F1 by about 0.025.
    assert fast["samples_f1_score"] == pytest.approx(reference["samples_f1_score"], abs=0.05)
    assert fast["val_loss"] == pytest.approx(reference["val_loss"], rel=0.02)

    # Emulated where the CPU lacks bfloat16, which is slow but gives the same numbers as native support.
    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: True)
    bfloat16, config = _run(shapes, tmp_path / "runs", "bfloat16")
    assert config["amp_dtype"] == "bfloat16"
    assert bfloat16["samples_f1_score"] == pytest.approx(reference["samples_f1_score"], abs=0.1)
    assert bfloat16["val_loss"] == pytest.approx(reference["val_loss"], rel=0.05)


def test_feature_cache_matches_backbone_every_epoch(shapes, tmp_path, caplog):
    settings = dict(model="efficientnet_lite0", image_size=64, freeze_backbone=True, augment=[], epochs=2)
    cached, _ = _run(shapes, tmp_path / "runs", "features", **settings)
    assert "computed backbone features of 200 images" in caplog.text
    recomputed, _ = _run(shapes, tmp_path / "runs", "backbone", feature_cache=False, **settings)
    assert cached["samples_f1_score"] == pytest.approx(recomputed["samples_f1_score"], abs=0.02)
    assert cached["val_loss"] == pytest.approx(recomputed["val_loss"], rel=1e-3)
    events = read_progress(tmp_path / "runs" / "features" / "progress.jsonl")
    assert [event["epoch"] for event in events if event["event"] == "epoch_end"] == [1, 2]


def test_feature_cache_with_augmentation_says_so(shapes, tmp_path, caplog):
    _run(shapes, tmp_path / "runs", "noted", model="efficientnet_lite0", image_size=64, freeze_backbone=True,
         epochs=1, augment=["hflip"])
    assert "without augmentation; --no-feature-cache applies it" in caplog.text


def test_inputs_pipeline_channels_last():
    pipeline = InputPipeline(torch.device("cpu"), BatchAugment([0.5] * 3, [0.5] * 3), True)
    images = pipeline.images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert pipeline.images(None) is None


def _epoch_orders(loader, generator, epochs, seed=7):
    """Return the row order of each epoch, reseeding like the training loop."""
    orders = []
    for epoch in epochs:
        generator.manual_seed(seed * 100_003 + epoch)
        orders.append([int(row) for features, _, _ in loader for row in features[:, 0]])
    return orders


@pytest.mark.parametrize("sampler", ["shuffle", "weighted"])
def test_row_order_independent_of_workers_and_resume(sampler):
    # Persistent worker processes must not change which rows an epoch draws, nor may a resumed run.
    count = 40
    rows = SimpleNamespace(encoded=[encode_trigrams("a cat")] * count,
                           targets=torch.eye(4)[torch.arange(count) % 4])
    features = FeatureRows(torch.arange(count, dtype=torch.float32).unsqueeze(1), rows)
    config = TrainConfig(batch_size=8, seed=7, sampler=sampler)
    orders = {}
    for workers in (0, 1):
        generator = torch.Generator()
        loader, _ = _loaders(config, features, features, rows.targets.numpy(), workers, torch.device("cpu"), generator)
        orders[workers] = _epoch_orders(loader, generator, [1, 2, 3])
    resumed_generator = torch.Generator()
    resumed, _ = _loaders(config, features, features, rows.targets.numpy(), 1, torch.device("cpu"), resumed_generator)
    resumed_orders = _epoch_orders(resumed, resumed_generator, [2, 3])

    assert orders[1] == orders[0]
    assert resumed_orders == orders[0][1:]
    assert orders[0][1] != orders[0][2]
