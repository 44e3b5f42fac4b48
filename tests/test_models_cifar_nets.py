import pytest
import torch
from torch import nn

from ibau import models
from ibau.models import DenseNet121, GoogLeNet, Normalized, ResNet18, SmallVGG, features

# Parameter counts at width 1 with 10 classes, as documented in the class docstrings.
DOCUMENTED = {"resnet18": 11_173_962, "googlenet": 6_158_346, "densenet121": 6_956_298}
CLASSES = {"resnet18": ResNet18, "googlenet": GoogLeNet, "densenet121": DenseNet121}
NAMES = sorted(DOCUMENTED)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_documented(name):
    assert models.MODELS[name] is CLASSES[name]
    assert f"{DOCUMENTED[name]:,}" in CLASSES[name].__doc__
    assert "Table 7" in CLASSES[name].__doc__


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_head(name, one_thread):
    torch.manual_seed(0)
    net = models.create(name, width=0.25)
    assert isinstance(net.classifier, nn.Linear)
    x = torch.rand(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.classifier.weight.grad.abs().sum() > 0
    # Smallest supported input and a different class count.
    net43 = models.create(name, num_classes=43, width=0.25).eval()
    with torch.no_grad():
        assert net43(torch.rand(2, 3, 8, 8)).shape == (2, 43)
    assert net43.classifier.out_features == 43


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_and_width_scaling(name):
    full = n_params(models.create(name))
    assert abs(full - DOCUMENTED[name]) <= 0.05 * DOCUMENTED[name]
    quarter = n_params(models.create(name, width=0.25))
    assert quarter < full / 8  # channels / 4 -> parameters roughly / 16
    assert models.create(name, width=0.25, in_channels=1).classifier.in_features == \
        models.create(name, width=0.25).classifier.in_features
    with pytest.raises(ValueError):
        models.create(name, width=0)


def test_features_are_the_flattened_penultimate_layer(one_thread):
    torch.manual_seed(0)
    net = SmallVGG()
    net.train()
    x = torch.rand(7, 3, 32, 32)
    f = features(net, x, batch_size=3)
    assert f.shape == (7, 2048) and f.dtype == torch.float32 and f.device.type == "cpu"
    assert net.training and net.features[0].training  # modes restored
    net.eval()
    with torch.no_grad():
        expected = net.features(x).flatten(1)
    assert torch.allclose(f, expected, atol=1e-6)
    wrapped = Normalized(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with torch.no_grad():
        expected = net.features((x - 0.5) / 0.25).flatten(1)
    assert torch.allclose(features(wrapped, x), expected, atol=1e-5)
    assert features(net, x[:0]).shape == (0, 2048)


def test_features_of_the_new_models(one_thread):
    net = ResNet18(width=0.25)
    assert features(net, torch.rand(3, 3, 16, 16)).shape == (3, 128)


def test_features_needs_a_linear_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="nn.Linear"):
        features(net, torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        features(SmallVGG(), torch.rand(2, 3, 32, 32), batch_size=0)
