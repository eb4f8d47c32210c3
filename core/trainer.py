"""The training loop: configuration, data, model, epochs, checkpoints and progress events.

`train(config)` is the one training path; the command line (`python -m core train`)
and the dashboard both reach it through the CLI. It reads top to bottom: seed and
device, data, run folder, model, loss and optimizer, epoch loop, final metrics.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from core import datasets
from core.datasets import (
    AUGMENTATIONS,
    BatchAugment,
    CaptionedImages,
    DatasetError,
    DatasetFolder,
    ImageChecks,
    SkippedRow,
    collate_rows,
)
from core.imagecache import CACHE_DIR_NAME, ImageCache
from core.metrics import DEFAULT_THRESHOLD, decide, f1_scores, per_label_scores, sigmoid, tune_thresholds
from core.models import IMAGENET_MEAN, IMAGENET_STD, count_parameters, create_model, get_model_spec, list_models
from core.runs import (
    CHECKPOINT_FORMAT_VERSION,
    DEFAULT_RUNS_DIR,
    ProgressWriter,
    atomic_write,
    check_checkpoint_matches,
    check_run_name,
    describe_error,
    load_checkpoint,
    read_json,
    remove_temporary_files,
    restart_progress,
    run_lock,
    save_checkpoint,
    write_json,
)

logger = logging.getLogger(__name__)

LOSSES = ("bce", "soft_margin")
SAMPLERS = ("none", "weighted")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
NORMALIZATIONS = ("auto", "dataset", "imagenet", "none")
ABLATION_VARIANTS = ("base", "no_dropout", "no_captions", "batch_norm")
BATCH_NORM_MODELS = ("resnet18", "resnet50", "inception_v3", "efficientnet_lite0")
AUX_LOSS_WEIGHT = 0.4  # weight of Inception's auxiliary loss, as in torchvision's training reference
STEP_EVENT_INTERVAL = 1.0  # seconds between `step` progress events
SKIPPED_ROWS_FILE = "skipped_rows.csv"
CACHE_DIR = ".cache"  # under runs_dir: image checks, decoded images
IMAGE_CHECKS_FILE = Path(CACHE_DIR) / "image-checks.json"


@dataclass
class TrainConfig:
    """Every setting of a training run; stored as the run's config.json."""

    # data
    data: str | None = None  # dataset folder; None uses the generated demo dataset
    val_fraction: float = 0.2  # share of labelled rows held out for validation, in (0, 1)
    limit: int | None = None  # use only the first N labelled rows (quick trials); None uses all
    skip_bad_rows: bool = False  # leave out unusable rows (listed in skipped_rows.csv) instead of stopping

    # model
    model: str = "cnn2"  # a name from core.models.list_models()
    captions: bool = True  # fuse the caption trigram encoding at the first fully connected layer
    pretrained: bool | None = None  # ImageNet weights for the backbone; None: yes where available
    weights: str | None = None  # local backbone weights file instead of the default source
    freeze_backbone: bool = False  # train only the head (and caption branch)
    dropout: float = 0.5  # dropout probability in the head; 0 disables dropout
    batch_norm: bool = False  # batch normalisation after each convolution (basic_cnn, cnn2)
    conv_layers: int = 4  # convolution layers of cnn2: 4 or 5
    fc_layers: int | None = None  # fully connected layers in the head, 1-3; None: model default
    hidden_size: int | None = None  # width of hidden fully connected layers; None: model default
    image_size: int | None = None  # square input side in pixels; None: model's native size

    # preprocessing
    normalization: str = "auto"  # auto (pretrained: its statistics, else dataset), dataset, imagenet, none
    augment: list[str] = field(default_factory=lambda: ["hflip"])  # any of hflip, vflip, jitter, sharpness

    # loss and label imbalance
    loss: str = "bce"  # bce (BCE with logits) or soft_margin (multi-label soft margin)
    pos_weight: bool = False  # bce only: weight positives of each label by negatives/positives
    sampler: str = "none"  # none, or weighted: oversample rows with rare labels

    # optimisation
    optimizer: str = "adam"  # adam, adamw or sgd (momentum 0.9)
    lr: float = 1e-3  # learning rate
    weight_decay: float = 0.0  # L2 penalty (decoupled for adamw)
    scheduler: str = "none"  # none, or cosine: cosine decay of the learning rate to 0 over the epochs
    epochs: int = 5  # passes over the training part
    batch_size: int = 32  # rows per step
    seed: int = 0  # seeds the split, initialisation, shuffling and augmentation

    # system
    device: str = "auto"  # auto (CUDA, then Apple MPS, then CPU), cpu, cuda or mps
    amp: bool = True  # mixed precision: CUDA (bfloat16 or float16), CPUs with native bfloat16
    channels_last: bool = True  # channels-last memory format for image models
    image_cache: bool = True  # decode and resize each image once into a uint8 cache under runs_dir/.cache
    feature_cache: bool = True  # with freeze_backbone: compute backbone features once, then train the head
    workers: int | None = None  # data loading processes; None: sized to the machine

    # evaluation
    threshold: float = DEFAULT_THRESHOLD  # probability at which a label is predicted
    tune_thresholds: bool = True  # tune per-label thresholds on validation for predict and submit

    # output
    runs_dir: str = DEFAULT_RUNS_DIR  # folder that contains the run folders
    run_name: str | None = None  # run folder name; None: <model>-<date>-<time>
    ablation_group: str | None = None  # runs of one ablation study share this name
    ablation_variant: str | None = None  # base, or the change against it: no_dropout, no_captions, batch_norm

    def validate(self) -> None:
        """Check every field before any work starts; raise ValueError naming the field and the fix."""
        if self.model not in list_models():
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(list_models())}")
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        for name in self.augment:
            _check_choice("augment", name, AUGMENTATIONS)

        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"invalid val_fraction {self.val_fraction}; expected a number between 0 and 1")
        if self.limit is not None and self.limit < 2:
            raise ValueError(f"invalid limit {self.limit}; expected at least 2 rows")

        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"invalid dropout {self.dropout}; expected a probability in [0, 1)")
        if self.conv_layers not in (4, 5):
            raise ValueError(f"invalid conv_layers {self.conv_layers}; cnn2 supports 4 or 5")
        if self.fc_layers is not None and self.fc_layers not in (1, 2, 3):
            raise ValueError(f"invalid fc_layers {self.fc_layers}; expected 1, 2 or 3")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ValueError(f"invalid hidden_size {self.hidden_size}; expected a positive width")
        if self.image_size is not None and not 32 <= self.image_size <= 1024:
            raise ValueError(f"invalid image_size {self.image_size}; expected 32 to 1024 pixels")
        spec = get_model_spec(self.model)
        if self.image_size is not None and spec.uses_images and self.image_size < spec.min_input_size:
            raise ValueError(
                f"invalid image_size {self.image_size} for {self.model}; it needs at least {spec.min_input_size} pixels"
            )
        if self.weights is not None:
            if not spec.supports_pretrained:
                raise ValueError(f"--weights applies to pretrained backbones; {self.model} has none, so drop it")
            if self.pretrained is False:
                raise ValueError("--weights loads pretrained backbone weights; drop --no-pretrained or --weights")
            if not Path(self.weights).is_file():
                raise FileNotFoundError(f"weights file {self.weights} not found; check the path passed with --weights")

        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"invalid epochs {self.epochs} or batch_size {self.batch_size}; both must be at least 1")
        has_batch_norm = self.batch_norm or self.model in BATCH_NORM_MODELS
        if self.batch_size == 1 and has_batch_norm and not self.freeze_backbone:
            raise ValueError(f"batch_size 1 cannot train {self.model} with batch normalisation; use at least 2")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"invalid lr {self.lr}; expected a positive learning rate")
        if self.weight_decay < 0:
            raise ValueError(f"invalid weight_decay {self.weight_decay}; expected 0 or more")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"invalid threshold {self.threshold}; expected a probability between 0 and 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"invalid workers {self.workers}; expected 0 or more")

        if self.pos_weight and self.loss != "bce":
            raise ValueError("pos_weight applies to the bce loss only; drop it or use --loss bce")
        if self.model == "caption_only" and not self.captions:
            raise ValueError("caption_only needs captions; remove --no-captions or pick an image model")
        if self.run_name is not None:
            check_run_name(self.run_name)
        if self.ablation_variant is not None:
            _check_choice("ablation_variant", self.ablation_variant, ABLATION_VARIANTS)
        if (self.ablation_group is None) != (self.ablation_variant is None):
            raise ValueError("ablation_group and ablation_variant go together; pass both or neither")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config from a dict, ignoring keys that are not config fields (such as resolved values)."""
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def ablation_configs(base: TrainConfig, group: str) -> list[TrainConfig]:
    """Return the base run and one run per ablation, each changing one setting of `base`.

    The ablations are the ones the COMP5329 2021 report studied on its best CNN:
    without dropout, without captions, and with batch normalisation. An ablation
    that would not change anything for this model (batch norm on a model without
    the switch, no captions for caption_only, no dropout when it is already 0) is left out.
    """
    variants = {"base": {}}
    if base.dropout > 0:
        variants["no_dropout"] = {"dropout": 0.0}
    if base.captions and base.model != "caption_only":
        variants["no_captions"] = {"captions": False}
    if not base.batch_norm and base.model in ("basic_cnn", "cnn2"):
        variants["batch_norm"] = {"batch_norm": True}
    configs = []
    for variant, changes in variants.items():
        values = {**base.to_dict(), **changes, "ablation_group": group, "ablation_variant": variant, "run_name": None}
        configs.append(TrainConfig(**values))
    return configs


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"invalid {name} {value!r}; choose one of: {', '.join(allowed)}")


# ----------------------------------------------------------------------------- setup helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(requested: str) -> torch.device:
    """Pick CUDA, then Apple MPS, then CPU for "auto"; raise ValueError if a forced device is missing."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if cuda:
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not cuda:
        raise ValueError("device cuda requested but no CUDA GPU is available; use --device auto or cpu")
    if requested == "mps" and not mps:
        raise ValueError("device mps requested but Apple MPS is not available; use --device auto or cpu")
    return torch.device(requested)


def available_devices() -> list[str]:
    """Return the device choices usable on this machine: auto, cpu, and cuda or mps when present."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def default_workers(decodes_images: bool) -> int:
    """Data loading processes: none when rows come from memory, else one per spare core, at most 8."""
    if not decodes_images:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def new_run_dir(runs_dir: Path, run_name: str | None, model: str) -> Path:
    """Create a new run folder; a generated name gets a numeric suffix if the folder exists."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    if run_name is not None:
        path = runs_dir / check_run_name(run_name)
        try:
            path.mkdir()
        except FileExistsError:
            raise ValueError(f"run folder {path} already exists; choose another --run-name") from None
        return path
    base = f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
    for suffix in range(1000):
        path = runs_dir / (base if suffix == 0 else f"{base}-{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {runs_dir}")


def library_versions() -> dict[str, str]:
    import PIL
    import sklearn
    import torchvision

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "scikit-learn": sklearn.__version__,
    }
    # torch.__version__ is a str subclass that weights-only checkpoint loading rejects.
    return {name: str(version) for name, version in versions.items()}


def pos_weights(train_targets: np.ndarray) -> torch.Tensor:
    """Per-label BCE positive weights: negatives / positives on the training part (1 for absent labels)."""
    positives = train_targets.sum(axis=0)
    negatives = len(train_targets) - positives
    weights = np.divide(negatives, positives, out=np.ones_like(positives), where=positives > 0)
    return torch.tensor(weights, dtype=torch.float32)


def row_sample_weights(train_targets: np.ndarray) -> torch.Tensor:
    """Weight each row by the inverse frequency of its rarest label, for WeightedRandomSampler."""
    counts = train_targets.sum(axis=0)
    inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    weights = (train_targets * inverse).max(axis=1)
    weights[weights == 0] = inverse[inverse > 0].min() if (inverse > 0).any() else 1.0
    return torch.tensor(weights, dtype=torch.double)


def build_loss(name: str, positive_weights: torch.Tensor | None) -> nn.Module:
    if name == "soft_margin":
        return nn.MultiLabelSoftMarginLoss()
    return nn.BCEWithLogitsLoss(pos_weight=positive_weights)


def build_optimizer(name: str, parameters, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    # The fused Adam kernels run a step over the 9M-weight caption layer about 7 times
    # faster than the default on a 2-core CPU (measured with torch 2.14).
    fused = device.type in ("cpu", "cuda")
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=fused)


def cpu_has_native_bfloat16() -> bool:
    """Return True when the CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """Return the mixed-precision dtype, or None for full precision.

    CUDA uses bfloat16 where supported, else float16. A CPU uses bfloat16 only when it
    has native support; elsewhere bfloat16 is emulated and slower than float32.
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


@dataclass
class InputPipeline:
    """Turns a loader batch into model input on the device: transfer, augmentation, memory format."""

    device: torch.device
    augment: BatchAugment | None  # None for caption-only rows
    channels_last: bool
    generator: torch.Generator | None = None  # draws the random augmentations

    def images(self, images: torch.Tensor | None) -> torch.Tensor | None:
        if images is None:
            return None
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = self.augment(images, self.generator)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


class FeatureRows(torch.utils.data.Dataset):
    """Rows of (backbone features, encoded caption, target), read from tensors in memory."""

    def __init__(self, features: torch.Tensor, rows: CaptionedImages) -> None:
        self.features = features
        self.encoded = rows.encoded
        self.targets = rows.targets

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int):
        return self.features[index], self.encoded[index], self.targets[index]


# ----------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """The training and validation parts of a dataset, ready for loaders."""

    folder: DatasetFolder
    train_rows: Any  # pandas DataFrame
    val_rows: Any
    train_targets: np.ndarray
    val_targets: np.ndarray
    image_size: int
    mean: list[float] | None  # None until computed from the training images
    std: list[float] | None


@dataclass
class CheckedRows:
    """The rows a run can use, and those it cannot."""

    folder: DatasetFolder
    rows: Any  # pandas DataFrame of usable rows of train.csv
    skipped: list[SkippedRow]  # invalid rows, and rows whose image is missing or unreadable
    unused_images: list[str]  # files in the image folder that no row names


def load_checked_rows(config: TrainConfig) -> CheckedRows:
    """Load the dataset and the rows the run will use, checking every row, image and caption.

    With no `config.data`, the demo dataset is generated if needed and `config.data`
    is set to it. Invalid rows, and rows whose image is missing, outside the image
    folder or undecodable, stop the run unless `config.skip_bad_rows` allows leaving them out.

    Raises:
        ValueError, FileNotFoundError: the dataset cannot serve this run; the message gives the reason.
    """
    if config.data is None:
        from core.demo import ensure_demo_dataset

        config.data = str(ensure_demo_dataset())
        logger.info("no --data given; using the generated demo dataset in %s", config.data)
    skipped: list[SkippedRow] = []
    folder = datasets.load_dataset(config.data, skipped)
    rows = folder.train if config.limit is None else folder.train.iloc[: config.limit]
    unused: list[str] = []
    if get_model_spec(config.model).uses_images:
        if not folder.has_images:
            raise ValueError(
                f"{folder.root} has no {datasets.IMAGE_DIR_NAME}/ folder, so {config.model} cannot train on it; "
                "use --model caption_only for a caption-only dataset"
            )
        checks = ImageChecks(Path(config.runs_dir) / IMAGE_CHECKS_FILE)
        image_problems = folder.image_problems(rows, checks.check)
        bad_lines = {problem.line for problem in image_problems}
        rows = rows[~rows["line"].isin(bad_lines)]
        skipped = sorted(skipped + image_problems, key=lambda problem: problem.line)
        unused = folder.unused_images(problem.image_id for problem in skipped)
        if unused:
            logger.warning(
                "%d file(s) in %s have no row in train.csv or test.csv and are not used, for example %s",
                len(unused), folder.image_dir, ", ".join(unused[:3]),
            )
    train_csv = folder.root / "train.csv"
    if skipped and not config.skip_bad_rows:
        raise DatasetError(datasets.format_problems(
            train_csv, [problem.describe() for problem in skipped],
            f"Fix or remove these rows, or pass --skip-bad-rows to train on the other {len(rows)} row(s); "
            f"the skipped rows are then listed in the run folder's {SKIPPED_ROWS_FILE}.",
            what="unusable row(s)",
        ))
    if skipped:
        logger.warning("%s: skipping %d unusable row(s); %d row(s) remain", train_csv, len(skipped), len(rows))
    if len(rows) == 0:
        raise DatasetError(f"{train_csv}: no usable rows remain after skipping {len(skipped)}; fix the rows listed above")
    if config.captions and not any(caption.strip() for caption in rows["Caption"]):
        raise ValueError(
            f"{train_csv} has no captions (no Caption column, or every caption is empty); "
            "add a Caption column or train with --no-captions"
        )
    return CheckedRows(folder=folder, rows=rows, skipped=skipped, unused_images=unused)


def rows_fingerprint(rows) -> str:
    """Return a SHA-1 over the ImageIDs, labels and captions of `rows`, in order."""
    digest = hashlib.sha1()
    for image_id, labels, caption in zip(rows["ImageID"], rows["Labels"], rows["Caption"]):
        digest.update(f"{image_id}\t{' '.join(map(str, labels))}\t{caption}\n".encode("utf-8"))
    return digest.hexdigest()


def write_skipped_rows(path: Path, skipped: Sequence[SkippedRow]) -> None:
    """Write the skipped rows as CSV: file, line, ImageID, reason."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", "line", "ImageID", "reason"])
    writer.writerows([row.file, row.line, row.image_id, row.reason] for row in skipped)
    atomic_write(path, lambda handle: handle.write(text.getvalue().encode("utf-8")))


def _statistics(config: TrainConfig, uses_images: bool,
                pretrained: bool) -> tuple[list[float] | None, list[float] | None]:
    """Choose the normalisation mean and std for the run's images; (None, None) for the images' own statistics."""
    spec = get_model_spec(config.model)
    normalization = config.normalization
    if normalization == "auto":
        normalization = "pretrained" if pretrained else "dataset"
    if uses_images and normalization == "pretrained":
        return list(spec.mean), list(spec.std)
    if uses_images and normalization == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if uses_images and normalization == "dataset":
        return None, None  # computed from the training images once they are loaded
    return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def prepare_data(config: TrainConfig, checked: CheckedRows, uses_images: bool, pretrained: bool) -> PreparedData:
    """Split the checked rows and choose the normalisation statistics."""
    folder, rows = checked.folder, checked.rows
    targets = datasets.targets_from_labels(rows["Labels"], folder.labels)
    train_index, val_index = datasets.split_indices(targets, config.val_fraction, config.seed)
    image_size = config.image_size or get_model_spec(config.model).input_size
    mean, std = _statistics(config, uses_images, pretrained)
    return PreparedData(
        folder=folder,
        train_rows=rows.iloc[train_index],
        val_rows=rows.iloc[val_index],
        train_targets=targets[train_index],
        val_targets=targets[val_index],
        image_size=image_size,
        mean=mean,
        std=std,
    )


def prepare_resumed_data(config: TrainConfig, resolved: dict[str, Any], run_dir: Path) -> PreparedData:
    """Rebuild a run's train and validation parts from split.json, as they were when it started.

    Raises:
        DatasetError: rows of the split are gone from train.csv or their images are unusable now.
    """
    folder = datasets.load_dataset(config.data, skipped=[])
    # The label set is the run's own, even if train.csv gained or lost labels since.
    folder.labels = [int(label) for label in resolved["labels"]]
    folder.label_names = {int(label): name for label, name in resolved["label_names"].items()}
    split = read_json(run_dir / "split.json")
    by_id = folder.train.set_index("ImageID", drop=False)
    parts = []
    for name in ("train", "val"):
        missing = [image_id for image_id in split[name] if image_id not in by_id.index]
        if missing:
            raise CannotResumeError(
                f"{len(missing)} row(s) of run {run_dir.name} are no longer valid rows of {folder.root / 'train.csv'}, "
                f"for example {missing[0]!r}; the dataset changed since the run started, so start a new run instead"
            )
        part = by_id.loc[list(split[name])].reset_index(drop=True)
        recorded = split.get("fingerprints", {}).get(name)
        if recorded is not None and rows_fingerprint(part) != recorded:
            raise CannotResumeError(
                f"the labels or captions of run {run_dir.name}'s {name} rows in {folder.root / 'train.csv'} changed "
                "since the run started; restore the file or start a new run"
            )
        parts.append(part)
    if resolved.get("uses_images"):
        checks = ImageChecks(Path(config.runs_dir) / IMAGE_CHECKS_FILE)
        problems = folder.image_problems(pd.concat(parts), checks.check)
        if problems:
            raise CannotResumeError(datasets.format_problems(
                folder.root / "train.csv", [problem.describe() for problem in problems],
                "These images changed since the run started; restore them or start a new run.",
                what="unusable row(s)",
            ))
    return PreparedData(
        folder=folder,
        train_rows=parts[0],
        val_rows=parts[1],
        train_targets=datasets.targets_from_labels(parts[0]["Labels"], folder.labels),
        val_targets=datasets.targets_from_labels(parts[1]["Labels"], folder.labels),
        image_size=resolved["image_size"] or 0,
        mean=list(resolved["mean"]),
        std=list(resolved["std"]),
    )


def make_dataset(data: PreparedData, rows, targets: np.ndarray, uses_images: bool,
                 cache: ImageCache | None) -> CaptionedImages:
    """Build the rows of one part: uint8 images from the cache, or decoded on each read without one."""
    paths = data.folder.image_paths(rows) if uses_images else None
    cached = cache.load(paths) if cache is not None and paths is not None else None
    return CaptionedImages(None if cached is not None else paths, list(rows["Caption"]), targets, data.image_size,
                           None, cached=cached)


# ----------------------------------------------------------------------------- epochs


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    progress: ProgressWriter,
    inputs: InputPipeline,
    on_features: bool = False,
) -> dict[str, float]:
    """Run one pass over `loader`; return the mean training loss, throughput and duration.

    With `on_features`, the loader yields backbone features and only the head trains.
    """
    model.train()
    total_loss, total_rows = 0.0, 0
    steps = len(loader)
    started = last_event = time.perf_counter()
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}", unit="step", leave=False, file=sys.stderr, disable=None)
    for step, (images, captions, targets) in enumerate(bar, start=1):
        images = inputs.images(images)
        captions = captions.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if on_features:
                logits, aux_logits = model.classify(images, captions), None
            else:
                logits, aux_logits = model(images, captions, return_aux=True)
            loss = loss_fn(logits.float(), targets)
            if aux_logits is not None:
                loss = loss + AUX_LOSS_WEIGHT * loss_fn(aux_logits.float(), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {epoch}, step {step}; "
                "lower the learning rate (--lr) or check the data"
            )

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        rows = len(targets)
        total_loss += loss.item() * rows
        total_rows += rows
        now = time.perf_counter()
        bar.set_postfix(loss=f"{total_loss / total_rows:.4f}")
        if now - last_event >= STEP_EVENT_INTERVAL or step == steps:
            progress.emit(
                "step", epoch=epoch, step=step, steps=steps, train_loss=total_loss / total_rows,
                images_per_second=total_rows / max(now - started, 1e-9),
            )
            last_event = now
    bar.close()
    seconds = time.perf_counter() - started
    return {"train_loss": total_loss / max(total_rows, 1), "train_seconds": seconds,
            "train_images_per_second": total_rows / max(seconds, 1e-9)}


@torch.no_grad()
def predict_loader(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
    inputs: InputPipeline, on_features: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (logits, targets) for every row of `loader`, in order."""
    model.eval()
    all_logits, all_targets = [], []
    for images, captions, targets in loader:
        images = inputs.images(images)
        captions = captions.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model.classify(images, captions) if on_features else model(images, captions)
        all_logits.append(logits.float().cpu().numpy())
        all_targets.append(targets.numpy())
    return np.concatenate(all_logits), np.concatenate(all_targets)


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None, inputs: InputPipeline
) -> torch.Tensor:
    """Run the (frozen) backbone over every image of `loader` once; return (rows, feature_dim) float32 on the CPU."""
    model.eval()
    features = []
    for images, _, _ in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model.image_features(inputs.images(images))
        features.append((output[0] if isinstance(output, tuple) else output).float().cpu())
    return torch.cat(features)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    threshold: float | np.ndarray,
    labels: Sequence[int],
    label_names: dict[int, str],
    inputs: InputPipeline,
    on_features: bool = False,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Score `model` on `loader`: validation loss, samples/micro/macro F1 and per-label scores.

    Returns:
        (metrics, probs, targets), the last two of shape (rows, labels).
    """
    logits, targets = predict_loader(model, loader, device, amp_dtype, inputs, on_features)
    val_loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(targets)).item())
    probs = sigmoid(logits)
    predictions = decide(probs, threshold)
    metrics: dict[str, Any] = {"val_loss": val_loss, **f1_scores(targets, predictions)}
    metrics["per_label"] = per_label_scores(targets, predictions, labels, label_names)
    return metrics, probs, targets


# ----------------------------------------------------------------------------- train


def create_run(config: TrainConfig) -> tuple[Path, CheckedRows]:
    """Validate `config`, create its run folder and write the settings to config.json.

    Called before `train` so that the caller can attach a log file to the folder. The
    device and the data are checked first, so invalid input leaves no run folder.

    Returns:
        (run folder, checked rows); pass both to `train` so the rows are not checked twice.
    """
    config.validate()
    if config.data is not None and Path(config.data).is_file():
        raise ValueError(f"{config.data} is a file; pass the folder that contains train.csv")
    if config.data is not None and not Path(config.data).is_dir():
        raise FileNotFoundError(f"dataset folder {config.data} not found; pass a folder that contains train.csv")
    if config.data is not None:
        config.data = str(Path(config.data).resolve())  # so evaluate works from any directory
    # Fail on a missing device or unusable data before a run folder exists.
    select_device(config.device)
    checked = load_checked_rows(config)
    run_dir = new_run_dir(Path(config.runs_dir), config.run_name, config.model)
    config.run_name = run_dir.name
    write_json(run_dir / "config.json", config.to_dict())
    return run_dir, checked


def train(config: TrainConfig, run_dir: Path | None = None, checked: CheckedRows | None = None) -> Path:
    """Train one run end to end and return its run folder.

    Args:
        config: the run's settings.
        run_dir: a folder made by `create_run(config)`; None creates one.
        checked: the rows `create_run` returned with `run_dir`; None checks the dataset again.

    Raises:
        ValueError, FileNotFoundError: invalid settings or data, before the first step.
        FloatingPointError: the loss became NaN or infinite; the last good checkpoint is kept.
    """
    if run_dir is None:
        run_dir, checked = create_run(config)
    with run_lock(run_dir):
        _train_logged(config, run_dir, resume=None, checked=checked)
    return run_dir


class CannotResumeError(ValueError):
    """A run cannot be resumed: it finished, never started training, or its data changed."""


def resume(run_dir: Path) -> Path:
    """Continue an interrupted or failed run from its last complete epoch to its planned epochs.

    The settings, split and normalisation come from the run folder; last.pt gives the
    weights, optimizer state and epoch history. Epochs after the checkpoint, written
    before the process stopped, are dropped from progress.jsonl and trained again.
    A run stopped during its first epoch starts again from epoch 1 on the same split.

    Raises:
        RunInUseError: another process is training the run.
        CannotResumeError: the run cannot be resumed; the message gives the reason.
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        resolved = read_json(run_dir / "config.json")
        if not isinstance(resolved, dict) or "labels" not in resolved or not (run_dir / "split.json").is_file():
            raise CannotResumeError(f"run {run_dir.name} stopped before its data was prepared, so there is "
                                    "nothing to continue; start a new run instead")
        config = TrainConfig.from_dict(resolved)
        removed = remove_temporary_files(run_dir)
        if removed:
            logger.info("removed %d temporary file(s) left by the stopped process", removed)
        last = run_dir / "last.pt"
        state = None
        if last.is_file():
            state = load_checkpoint(last)
            try:
                check_checkpoint_matches(state, resolved, last)
            except ValueError as error:
                raise CannotResumeError(str(error)) from error
            if state.get("format_version", 1) < CHECKPOINT_FORMAT_VERSION:
                raise CannotResumeError(f"{last} was written by an older version without the epoch history; "
                                        "start a new run instead")
            if (run_dir / "metrics.json").is_file() and state["epoch"] >= config.epochs:
                raise CannotResumeError(f"run {run_dir.name} already finished its {config.epochs} epoch(s)")
            _repair_best_checkpoint(run_dir, state)
        done = int(state["epoch"]) if state is not None else 0
        logger.info("resuming run %s after epoch %d of %d", run_dir.name, done, config.epochs)
        restart_progress(run_dir / "progress.jsonl", done, list(state["history"]) if state is not None else [])
        _train_logged(config, run_dir, resume=(resolved, state), checked=None)
    return run_dir


def _repair_best_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Make best.pt hold the best epoch of last.pt's history, after a stop between the two saves."""
    history = state["history"]
    if not history:
        return
    best_epoch = max(history, key=lambda event: event.get("samples_f1_score", float("-inf")))["epoch"]
    best_path = run_dir / "best.pt"
    saved_epoch = load_checkpoint(best_path)["epoch"] if best_path.is_file() else None
    if saved_epoch == best_epoch:
        return
    if best_epoch == state["epoch"]:
        save_checkpoint(best_path, state)
        logger.info("best.pt was older than last.pt; it now contains epoch %d", best_epoch)
    else:
        logger.warning("best.pt contains epoch %s, not the best epoch %d of the history; it is replaced when a "
                       "resumed epoch scores higher", saved_epoch, best_epoch)


def _train_logged(config: TrainConfig, run_dir: Path, resume: tuple[dict, dict] | None,
                  checked: CheckedRows | None) -> None:
    progress = ProgressWriter(run_dir / "progress.jsonl")
    started = {}
    if resume is not None:
        started["resumed_after_epoch"] = int(resume[1]["epoch"]) if resume[1] is not None else 0
    progress.emit("run_started", pid=os.getpid(), config=config.to_dict(), **started)
    try:
        best_metric, final = _train_in(config, run_dir, progress, resume, checked)
        progress.emit("run_finished", best_metric=best_metric, **{k: v for k, v in final.items() if k != "per_label"})
    except BaseException as error:
        progress.emit("run_failed", error_type=type(error).__name__, message=describe_error(error))
        raise
    finally:
        progress.close()


def _train_in(
    config: TrainConfig, run_dir: Path, progress: ProgressWriter, resume: tuple[dict, dict] | None,
    checked: CheckedRows | None,
) -> tuple[float, dict[str, Any]]:
    # Seed and device
    seed_everything(config.seed)
    device = select_device(config.device)
    amp_dtype = autocast_dtype(device, config.amp)
    spec = get_model_spec(config.model)
    pretrained = spec.supports_pretrained and config.pretrained is not False
    if config.freeze_backbone and spec.uses_images and not pretrained and resume is None:
        logger.warning("--freeze-backbone keeps the randomly initialised weights of %s's backbone, so only the head "
                       "learns, from random features; freeze a pretrained backbone, or train without "
                       "--freeze-backbone", config.model)

    # Data: checked and split for a new run; as recorded in the run folder for a resumed one
    if resume is None:
        if checked is None:
            checked = load_checked_rows(config)
        data = prepare_data(config, checked, spec.uses_images, pretrained)
        if checked.skipped:
            write_skipped_rows(run_dir / SKIPPED_ROWS_FILE, checked.skipped)
            logger.info("listed the %d skipped row(s) in %s", len(checked.skipped), run_dir / SKIPPED_ROWS_FILE)
    else:
        data = prepare_resumed_data(config, resume[0], run_dir)
    folder = data.folder
    cache = None
    if spec.uses_images and config.image_cache:
        cache = ImageCache(Path(config.runs_dir) / CACHE_DIR / CACHE_DIR_NAME, folder.image_dir, data.image_size)
    train_set = make_dataset(data, data.train_rows, data.train_targets, spec.uses_images, cache)
    val_set = make_dataset(data, data.val_rows, data.val_targets, spec.uses_images, cache)
    if data.mean is None:
        chosen = datasets.sample_indices(len(train_set), seed=config.seed)
        logger.info("computing channel statistics over %d training images", len(chosen))
        data.mean, data.std = datasets.stats_of_images(train_set[index][0] for index in chosen)
    # Cached rows are read from memory; decoding on every read needs worker processes.
    decodes = spec.uses_images and cache is None
    workers = config.workers if config.workers is not None else default_workers(decodes)
    if decodes:
        where = f"in {workers} worker process(es)" if workers else "in the main process"
        logger.info("image cache off: every image is decoded again in every epoch, %s", where)
    generator = torch.Generator().manual_seed(config.seed)
    augment_generator = torch.Generator()
    augment = BatchAugment(data.mean, data.std, config.augment) if spec.uses_images else None
    channels_last = config.channels_last and spec.uses_images
    train_inputs = InputPipeline(device, augment, channels_last, augment_generator)
    eval_inputs = InputPipeline(device, BatchAugment(data.mean, data.std) if spec.uses_images else None, channels_last)
    train_loader, val_loader = _loaders(config, train_set, val_set, data.train_targets, workers, device, generator)

    # Model, loss and optimizer; a resumed run takes its weights from last.pt
    saved = resume[1] if resume is not None else None  # last.pt of a resumed run
    model = create_model(
        config.model, len(folder.labels), captions=config.captions, pretrained=pretrained and saved is None,
        weights_path=config.weights if saved is None else None, dropout=config.dropout,
        batch_norm=config.batch_norm, conv_layers=config.conv_layers, fc_layers=config.fc_layers,
        hidden_size=config.hidden_size, image_size=data.image_size, freeze_backbone=config.freeze_backbone,
    ).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    positive_weights = pos_weights(data.train_targets) if config.pos_weight else None
    loss_fn = build_loss(config.loss, positive_weights.to(device) if positive_weights is not None else None)
    eval_loss_fn = build_loss(config.loss, positive_weights)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = build_optimizer(config.optimizer, trainable, config.lr, config.weight_decay, device)
    scheduler = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CannotResumeError(f"{run_dir / 'last.pt'}: weights or optimizer state do not fit the model "
                                    f"described in config.json ({error}); start a new run instead") from error
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
    if resume is not None:
        resolved = resume[0]
        history = list(saved["history"]) if saved is not None else []
        best_metric = float(saved["best_metric"]) if saved is not None else float("-inf")
    else:
        history, best_metric = [], float("-inf")
        # Resolved settings: config.json and split.json describe the run before the first step
        resolved = {
            **config.to_dict(),
            "pretrained": pretrained,
            "labels": folder.labels,
            "label_names": {str(label): name for label, name in folder.label_names.items()},
            "uses_images": spec.uses_images,
            "image_size": data.image_size if spec.uses_images else None,
            "mean": data.mean,
            "std": data.std,
            "encoder": {"name": "trigram", "dim": 26**3},
            "train_rows": len(train_set),
            "val_rows": len(val_set),
            "skipped_rows": len(checked.skipped),
            "unused_images": len(checked.unused_images),
            "parameters": count_parameters(model),
            "trainable_parameters": count_parameters(model, trainable_only=True),
            "device_used": str(device),
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
            "workers_used": workers,
            "channels_last": channels_last,
            "image_cache_dir": str(cache.root) if cache is not None else None,
            "versions": library_versions(),
            "created": datetime.now().isoformat(timespec="seconds"),
        }
        write_json(run_dir / "config.json", resolved)
        write_json(run_dir / "split.json", {
            "train": list(data.train_rows["ImageID"]),
            "val": list(data.val_rows["ImageID"]),
            "fingerprints": {"train": rows_fingerprint(data.train_rows), "val": rows_fingerprint(data.val_rows)},
        })
    logger.info(
        "run %s: %s on %s (%d train / %d validation rows, %d labels, %s parameters, %s)",
        run_dir.name, config.model, device, len(train_set), len(val_set), len(folder.labels),
        f"{resolved['parameters']:,}", f"{amp_dtype} autocast".replace("torch.", "") if amp_dtype else "float32",
    )

    # A frozen backbone gives the same features every epoch, so they are computed once.
    on_features = spec.uses_images and config.freeze_backbone and config.feature_cache
    if on_features:
        started = time.perf_counter()
        feature_sets = []
        for rows in (train_set, val_set):
            ordered = DataLoader(rows, batch_size=config.batch_size, shuffle=False, num_workers=workers,
                                 collate_fn=collate_rows, pin_memory=device.type == "cuda",
                                 generator=torch.Generator())
            feature_sets.append(FeatureRows(extract_features(model, ordered, device, amp_dtype, eval_inputs), rows))
        logger.info("computed backbone features of %d images in %.1f s; the epochs train the head on them%s",
                    len(train_set) + len(val_set), time.perf_counter() - started,
                    " (without augmentation; --no-feature-cache applies it)" if config.augment else "")
        train_loader, val_loader = _loaders(config, feature_sets[0], feature_sets[1], data.train_targets, 0, device,
                                            generator)
        train_inputs = eval_inputs = InputPipeline(device, None, False)

    # Epochs, then the final metrics of the best checkpoint
    state = TrainingState(model, optimizer, scheduler, scaler, generator, history, best_metric)
    step = StepSetup(device, amp_dtype, train_inputs, eval_inputs, augment_generator, on_features)
    _run_epochs(config, state, step, train_loader, val_loader, loss_fn, eval_loss_fn, folder, resolved, run_dir,
                progress)
    final = _finish_run(config, model, step, val_loader, eval_loss_fn, folder, run_dir)
    return state.best_metric, final


def _loaders(config: TrainConfig, train_set, val_set, train_targets: np.ndarray, workers: int,
             device: torch.device, generator: torch.Generator) -> tuple[DataLoader, DataLoader]:
    """Build the training loader (shuffled or weighted) and the validation loader.

    Only the sampler draws from `generator`, which the epochs reseed, so an epoch's
    row order depends on the seed and the epoch alone. The loaders' own generators
    seed the worker processes. Persistent workers draw that seed in the first epoch
    only, so a generator shared with the sampler would shift every later epoch's order.
    """
    if config.sampler == "weighted":
        sampler = WeightedRandomSampler(row_sample_weights(train_targets), len(train_set), generator=generator)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    options = dict(
        batch_size=config.batch_size, num_workers=workers, collate_fn=collate_rows,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    # A last training batch of one row would break batch normalisation, so it is dropped.
    drop_last = len(train_set) > 1 and len(train_set) % config.batch_size == 1
    train_loader = DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(config.seed),
                              drop_last=drop_last, **options)
    # Its own generator keeps the validation loader from drawing on the global random state, which dropout uses.
    return train_loader, DataLoader(val_set, shuffle=False, generator=torch.Generator(), **options)


@dataclass
class StepSetup:
    """Settings that turn batches into model output: device, precision and the input pipelines."""

    device: torch.device
    amp_dtype: torch.dtype | None
    train_inputs: InputPipeline
    eval_inputs: InputPipeline
    augment_generator: torch.Generator
    on_features: bool  # batches carry backbone features, so only the head runs


@dataclass
class TrainingState:
    """Training state that changes from epoch to epoch; last.pt saves it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a learning-rate scheduler, or None
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator  # shuffles and samples the training rows
    history: list[dict[str, Any]]  # the epoch_end event of every finished epoch
    best_metric: float  # best validation samples F1 so far

    def checkpoint(self, resolved: dict[str, Any], labels: list[int]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": len(self.history),
            "best_metric": self.best_metric,
            "history": self.history,
            "config": resolved,
            "labels": labels,
            "format_version": CHECKPOINT_FORMAT_VERSION,
        }


def _run_epochs(
    config, state: TrainingState, step: StepSetup, train_loader, val_loader, loss_fn, eval_loss_fn, folder,
    resolved, run_dir, progress,
) -> None:
    for epoch in range(len(state.history) + 1, config.epochs + 1):
        # Seeding each epoch gives the same rows and augmentations whether or not the run was resumed.
        state.generator.manual_seed(config.seed * 100_003 + epoch)
        step.augment_generator.manual_seed(config.seed * 100_003 + epoch + 50_000)
        trained = train_one_epoch(state.model, train_loader, loss_fn, state.optimizer, step.device, step.amp_dtype,
                                  state.scaler, epoch, progress, step.train_inputs, step.on_features)
        if state.scheduler is not None:
            state.scheduler.step()
        started = time.perf_counter()
        metrics, _, _ = evaluate(state.model, val_loader, eval_loss_fn, step.device, step.amp_dtype, config.threshold,
                                 folder.labels, folder.label_names, step.eval_inputs, step.on_features)
        if not math.isfinite(metrics["val_loss"]):
            raise FloatingPointError(
                f"validation loss became {metrics['val_loss']} after epoch {epoch}, so its weights are not saved; "
                "lower the learning rate (--lr) or check the data"
            )
        metrics["val_seconds"] = time.perf_counter() - started
        metrics["lr"] = state.optimizer.param_groups[0]["lr"]
        fields = {"epoch": epoch, "epochs": config.epochs, **trained, **metrics}
        improved = metrics["samples_f1_score"] > state.best_metric
        state.history.append({"time": round(time.time(), 3), "event": "epoch_end", **fields})
        state.best_metric = max(state.best_metric, metrics["samples_f1_score"])
        checkpoint = state.checkpoint(resolved, folder.labels)
        # last.pt first, so best.pt is never ahead of it; a resume repairs a best.pt left behind.
        save_checkpoint(run_dir / "last.pt", checkpoint)
        progress.emit("checkpoint_saved", epoch=epoch, file="last.pt")
        if improved:
            save_checkpoint(run_dir / "best.pt", checkpoint)
            progress.emit("checkpoint_saved", epoch=epoch, file="best.pt")
        progress.emit("epoch_end", **fields)
        logger.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, samples F1 %.4f, micro F1 %.4f, macro F1 %.4f (%.0f images/s)",
            epoch, config.epochs, trained["train_loss"], metrics["val_loss"], metrics["samples_f1_score"],
            metrics["micro_f1_score"], metrics["macro_f1_score"], trained["train_images_per_second"],
        )


def _finish_run(config, model, step: StepSetup, val_loader, eval_loss_fn, folder, run_dir) -> dict[str, Any]:
    """Reload the best checkpoint, tune thresholds and write metrics.json and thresholds.json."""
    best = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model"])
    metrics, probs, targets = evaluate(model, val_loader, eval_loss_fn, step.device, step.amp_dtype, config.threshold,
                                       folder.labels, folder.label_names, step.eval_inputs, step.on_features)
    final = {"best_epoch": best["epoch"], "threshold": config.threshold, **metrics}

    if config.tune_thresholds:
        thresholds = tune_thresholds(targets, probs)
        tuned = f1_scores(targets, decide(probs, thresholds))
        write_json(run_dir / "thresholds.json", {
            "source": "tuned on the validation part for samples F1",
            "thresholds": {str(label): float(value) for label, value in zip(folder.labels, thresholds)},
        })
        # Tuned and scored on the same rows, so these figures are optimistic.
        final["tuned"] = tuned
    write_json(run_dir / "metrics.json", final)
    logger.info(
        "best epoch %d: samples F1 %.4f, micro F1 %.4f, macro F1 %.4f at threshold %.2f%s",
        best["epoch"], final["samples_f1_score"], final["micro_f1_score"], final["macro_f1_score"],
        config.threshold,
        f"; with tuned thresholds samples F1 {final['tuned']['samples_f1_score']:.4f} (tuned on the same rows)"
        if "tuned" in final else "",
    )
    return final
