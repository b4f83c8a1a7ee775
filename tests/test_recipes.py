import pytest

from deepres.recipes import default_recipe, get_recipe


def test_the_imagenet_recipe_is_sec_3_4():
    imagenet = get_recipe("imagenet")
    assert (imagenet.lr, imagenet.momentum, imagenet.weight_decay) == (0.1, 0.9, 1e-4)
    assert imagenet.batch_size == 256 and imagenet.normalize == "channel"
    # 90 epochs of 5,004 full batches, lr divided by 10 at epochs 30 and 60.
    assert (imagenet.iters, imagenet.milestones) == (450_360, (150_120, 300_240))
    epoch = 5_004
    lrs = [imagenet.lr_at(e * epoch, False) for e in (0, 29, 30, 59, 60, 89)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # Scaled to a budget as the CIFAR recipe is: the milestones stay at a third and two thirds.
    assert imagenet.scaled(90).milestones == (30, 60)


def test_photos_get_the_imagenet_recipe_by_default():
    assert default_recipe("resnet18", photos=True) == "imagenet"
    assert default_recipe("resnet18") == "cifar"
    assert default_recipe("resnet110") == "cifar-warmup"


def test_photos_train_90_epochs_of_their_own_data_unless_told_otherwise():
    from dataclasses import replace

    from deepres.train import TrainConfig, _recipe

    config = TrainConfig("resnet18", "photos", "out")
    recipe, epoch = _recipe(config, 10_000, photos=True)
    assert epoch == 39 and (recipe.iters, recipe.milestones) == (3_510, (1_170, 2_340))
    recipe, _ = _recipe(config, 1_281_167, photos=True)
    assert (recipe.iters, recipe.milestones) == (450_360, (150_120, 300_240))
    assert _recipe(replace(config, epochs=2), 10_000, photos=True)[0].iters == 78
    assert _recipe(replace(config, iters=500), 10_000, photos=True)[0].iters == 500
    cifar, _ = _recipe(TrainConfig("resnet20", "cifar", "out"), 50_000, photos=False)
    assert (cifar.iters, cifar.milestones) == (64_000, (32_000, 48_000))
