import pytest
import torch

from ibau import models
from ibau.io import load_weights
from ibau.models.fuse import fold_batchnorm
from ibau.models import SmallVGG


@pytest.mark.parametrize("name,kwargs,shape", [
    ("small_vgg", {}, (2, 3, 32, 32)),
    ("small_vgg", {"num_classes": 43}, (2, 3, 32, 32)),
    ("small_vgg", {"in_channels": 1, "image_size": 8}, (2, 1, 8, 8)),
    ("preact_resnet18", {"width": 8}, (2, 3, 32, 32)),
])
def test_registry_builds_models(name, kwargs, shape):
    net = models.create(name, **kwargs).eval()
    out = net(torch.rand(shape))
    assert out.shape == (2, kwargs.get("num_classes", 10))


def test_unknown_model_and_duplicate_registration():
    with pytest.raises(KeyError, match="small_vgg"):
        models.create("resnet9000")
    with pytest.raises(ValueError):
        models.register("small_vgg")(SmallVGG)


def test_small_vgg_matches_the_authors_layer_layout():
    keys = SmallVGG().state_dict().keys()
    convs = {k.split(".")[1] for k in keys if k.startswith("features.") and k.endswith("weight")}
    assert convs == {"0", "1", "3", "4", "8", "9", "11", "12", "16", "17", "19", "20"}
    assert SmallVGG(num_classes=43).classifier.weight.shape == (43, 2048)


def test_fold_batchnorm_is_the_same_function_with_shared_parameters():
    torch.manual_seed(0)
    net = SmallVGG(num_classes=4, image_size=8)
    net.train()
    net(torch.rand(16, 3, 8, 8))  # non-trivial running statistics
    net.eval()
    view = fold_batchnorm(net, channels_last=True)
    assert view is not net
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    assert torch.allclose(view(x), net(x), atol=1e-5)
    ga = torch.autograd.grad(view(x).sum(), [x, *net.parameters()])
    gb = torch.autograd.grad(net(x).sum(), [x, *net.parameters()])
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        net.features[0].weight.mul_(2)  # the view sees changes of the model
    assert torch.allclose(view(x), net(x), atol=1e-5)


def test_fold_batchnorm_returns_untraceable_or_bn_free_models_unchanged():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.bn(self.conv(x))
            return x

    b = Branchy()
    assert fold_batchnorm(b) is b
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    assert fold_batchnorm(lin) is lin


@pytest.mark.slow
@pytest.mark.realdata
def test_released_checkpoints_load_strictly(shared_data):
    files = sorted((shared_data / "ibau-checkpoints").glob("*.pth"))
    assert len(files) == 10
    for f in files:
        net = SmallVGG(num_classes=43 if f.name.startswith("gtsrb") else 10)
        load_weights(net, f)  # strict=True inside
