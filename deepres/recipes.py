"""Training recipes as data: the paper's schedules, scaled to shorter budgets by proportion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from deepres.models import model_family


@dataclass(frozen=True)
class Recipe:
    """One training recipe: SGD with step decay, and an optional warm-up (Sec. 4.2)."""

    name: str
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    iters: int = 64_000
    milestones: tuple[int, ...] = (32_000, 48_000)
    gamma: float = 0.1
    # ResNet-110: lr 0.1 is too large to start converging, so use warmup_lr until the
    # training error drops below warmup_until_error, then lr. The warm-up caps the schedule
    # rather than replacing it: a run still warming up at a milestone steps down with it, and
    # an --lr below warmup_lr holds from the start.
    warmup_lr: float | None = None
    warmup_until_error: float = 0.80
    augment: bool = True
    normalize: str = "pixel"
    # A budget the paper gives in epochs (ImageNet's 90): with no --iters or --epochs, a run
    # trains this many epochs of its own data, the milestones moved in proportion. iters and
    # milestones are the paper's, on its data.
    epochs: int | None = None

    def scaled(self, iters: int) -> Recipe:
        """The same recipe over `iters` iterations, milestones moved in proportion."""
        if iters < 1:
            raise ValueError(f"the number of iterations must be positive, got {iters}")
        milestones = tuple(max(1, round(m * iters / self.iters)) for m in self.milestones)
        return replace(self, iters=iters, milestones=milestones)

    def lr_at(self, iteration: int, warming_up: bool) -> float:
        """Learning rate of the given iteration."""
        lr = self.lr * self.gamma ** sum(iteration >= m for m in self.milestones)
        if warming_up and self.warmup_lr is not None:
            return min(lr, self.warmup_lr)
        return lr

    def warmed_up(self, train_error: float) -> bool:
        """Whether a warm-up ends, given the training error (0-1) of the last log window."""
        # The paper's rule as it words it. A 400-iteration least length ("about 400
        # iterations", it says) did not spare ResNet-110 the jump at the switch to 0.1 and
        # was behind at iteration 500 (docs/results/resnet110-warmup-probe).
        return train_error < self.warmup_until_error

    def to_dict(self) -> dict:
        """A JSON-ready copy."""
        return asdict(self)


# Full batches of 256 in an epoch of ImageNet's 1,281,167 training images.
IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 256

RECIPES = {
    # Sec. 4.2: batch 128, lr 0.1, /10 at 32k and 48k, stop at 64k, wd 1e-4, momentum 0.9.
    "cifar": Recipe("cifar"),
    "cifar-warmup": Recipe("cifar-warmup", warmup_lr=0.01),
    # Sec. 3.4: batch 256, lr 0.1 divided by 10 "when the error plateaus", here at epochs 30
    # and 60 of 90 as it is commonly rendered (450k iterations; the paper trains up to 600k),
    # wd 1e-4, momentum 0.9. Photos of many sizes have no mean image: per-channel statistics.
    "imagenet": Recipe(
        "imagenet",
        batch_size=256,
        iters=90 * IMAGENET_STEPS_PER_EPOCH,
        milestones=(30 * IMAGENET_STEPS_PER_EPOCH, 60 * IMAGENET_STEPS_PER_EPOCH),
        normalize="channel",
        epochs=90,
    ),
}


def default_recipe(model: str, photos: bool = False) -> str:
    """The paper's recipe for a net: ImageNet's on full-size photos, else CIFAR's (Sec. 4.2)."""
    if photos:
        return "imagenet"
    # CIFAR nets of 110 layers and more warm up (Sec. 4.2); the ImageNet nets never did.
    depth = int("".join(c for c in model if c.isdigit()) or 0)
    return "cifar-warmup" if depth >= 110 and model_family(model) == "cifar" else "cifar"


def get_recipe(name: str) -> Recipe:
    """A recipe by name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]
