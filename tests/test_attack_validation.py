"""Every attack checks its arguments up front: InputError naming the parameter."""

from __future__ import annotations

import math

import pytest
import torch

from ibau.attacks import (
    AllToAll, BadNets, Blend, HiddenTrigger, InputAware, L0Inv, L2Inv, MultiTrigger, SemanticReplacement, Smooth,
    Trigger, TrojanSquare, TrojanWatermark, WaNet, create_attack,
)
from ibau.data.poison import check_attack_targets, poison
from ibau.errors import InputError
from ibau.registry import UnknownName


@pytest.mark.parametrize("make, param", [
    (lambda: BadNets(target=-1), "target"),
    (lambda: BadNets(target=1.5), "target"),
    (lambda: BadNets(target="8"), "target"),
    (lambda: BadNets(patch=0), "patch"),
    (lambda: BadNets(patch=40), "patch"),
    (lambda: BadNets(image_shape=(3, 32)), "image_shape"),
    (lambda: BadNets(image_shape=(3, 0, 32)), "image_shape"),
    (lambda: Blend(alpha=1.5), "alpha"),
    (lambda: Blend(alpha=math.nan), "alpha"),
    (lambda: Blend(seed=-1), "seed"),
    (lambda: Blend(image=torch.full((3, 4, 4), math.nan)), "image"),
    (lambda: Smooth(max_value=0), "max_value"),
    (lambda: Smooth(sigma=math.inf), "sigma"),
    (lambda: Smooth(steps=-1), "steps"),
    (lambda: L0Inv(pixels=0), "pixels"),
    (lambda: L2Inv(norm=-1), "norm"),
    (lambda: L2Inv(lr=0), "lr"),
    (lambda: L2Inv(batch_size=0), "batch_size"),
    (lambda: TrojanSquare(size=30), "size"),
    (lambda: TrojanWatermark(neurons=0), "neurons"),
    (lambda: AllToAll(num_classes=1), "num_classes"),
    (lambda: MultiTrigger([]), "pairs"),
    (lambda: MultiTrigger([(BadNets(), -2)]), "pairs[0]"),
    (lambda: SemanticReplacement(image=42), "image"),
    (lambda: WaNet(k=1), "k"),
    (lambda: WaNet(s=math.nan), "s"),
    (lambda: InputAware(poison_ratio=2), "poison_ratio"),
    (lambda: HiddenTrigger(eps=0), "eps"),
    (lambda: HiddenTrigger(source=-1), "source"),
    (lambda: HiddenTrigger(location="everywhere"), "location"),
    (lambda: create_attack("badnets", size=3), "size"),
])
def test_bad_arguments_raise_input_error_naming_the_parameter(make, param):
    with pytest.raises(InputError) as info:
        make()
    assert param in str(info.value)


def test_unknown_attack_is_an_input_error():
    with pytest.raises(UnknownName, match="unknown attack 'nope'; known: all_to_all"):
        create_attack("nope")


def test_trigger_refuses_non_finite_and_bad_files(tmp_path):
    with pytest.raises(InputError, match="NaN or inf"):
        Trigger(torch.full((3, 4, 4), math.inf))
    with pytest.raises(InputError, match="mask"):
        Trigger(torch.zeros(3, 4, 4), torch.full((3, 4, 4), 2.0))
    (tmp_path / "t.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read trigger image"):
        Trigger.from_image(tmp_path / "t.png")


def test_targets_are_checked_against_the_class_count():
    x, y = torch.rand(20, 3, 32, 32), torch.arange(20) % 4
    with pytest.raises(InputError, match="target 8 is not a class"):
        poison(x, y, BadNets(target=8), 0.2, num_classes=4)
    with pytest.raises(InputError, match="target 8 is not a class"):
        check_attack_targets(BadNets(target=8), 4)
    with pytest.raises(InputError, match="target 7"):
        check_attack_targets(MultiTrigger([(BadNets(target=0), 0), (BadNets(target=7), 7)]), 5)
    check_attack_targets(AllToAll(num_classes=4), 4)
    with pytest.raises(InputError, match="num_classes"):
        check_attack_targets(AllToAll(num_classes=10), 4)
    assert int(poison(x, y, BadNets(target=2), 0.2, num_classes=4).mask.sum()) == 4


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, 2, math.nan, "0.2"])
def test_poison_ratio_must_be_in_0_1(ratio):
    x, y = torch.rand(10, 3, 32, 32), torch.arange(10) % 2
    with pytest.raises(InputError, match="ratio"):
        poison(x, y, BadNets(target=0), ratio)


def test_poisoning_helpers_validate():
    from ibau.poisoning import poison_and_train, subset
    from ibau.train import TrainConfig

    x, y = torch.rand(10, 3, 32, 32), torch.arange(10) % 2
    with pytest.raises(InputError, match="subset"):
        subset(x, y, 0, 0)
    assert subset(x, y, 3, 0)[0].shape[0] == 3
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(InputError, match="target 8 is not a class of the model"):
        poison_and_train(model, x, y, BadNets(target=8), config=TrainConfig(epochs=1), progress=False)
    with pytest.raises(InputError, match="ratio"):
        poison_and_train(model, x, y, BadNets(target=1), ratio=2, config=TrainConfig(epochs=1), progress=False)


def test_generated_trigger_target_is_checked_against_the_model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    atk = L2Inv(target=5, steps=1, image_shape=(3, 8, 8))
    with pytest.raises(InputError, match="target"):
        atk.prepare(model, torch.rand(4, 3, 8, 8))
