"""The device-resident data path: normalisation, the 45k/5k split, and batched augmentation.

The whole data set lives on the training device as one uint8 tensor; a batch is gathered,
normalised and augmented there in a few tensor operations, with no per-sample Python.
Every random draw is derived from (seed, iteration) and made on the CPU, so a run resumed at
any iteration, on a CPU or a GPU, sees exactly the batches it would have seen had it never
stopped (a CPU and a GPU generator draw other numbers from one seed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The held-out split must not move when the training seed changes.
SPLIT_SEED = 0


def split_train_val(n: int, val_split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and held-out images; the same for every run (fixed seed)."""
    if not 0 <= val_split < n:
        raise ValueError(f"--val-split must be between 0 and {n - 1}, got {val_split}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[val_split:].sort().values, order[:val_split].sort().values


class Preprocess(nn.Module):
    """uint8 images to the net's input: scale to [0, 1], subtract the mean, divide by the std.

    The paper subtracts the per-pixel mean image (Sec. 3.4, 4.2); `normalize="channel"` is the
    per-channel mean and std that later libraries use.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    @classmethod
    def fit(cls, images: torch.Tensor, normalize: str = "pixel") -> Preprocess:
        """Statistics of a uint8 [N, C, H, W] training set, per pixel or per channel."""
        if normalize not in ("pixel", "channel"):
            raise ValueError(f"normalize must be 'pixel' or 'channel', got {normalize!r}")
        c = images.shape[1]
        total = torch.zeros(images.shape[1:], dtype=torch.float64)
        total_sq = torch.zeros(c, dtype=torch.float64)
        for chunk in images.split(4096):
            x = chunk.double() / 255
            total += x.sum(0)
            total_sq += (x**2).sum((0, 2, 3))
        n = images.shape[0]
        mean_image = total / n
        if normalize == "pixel":
            return cls(mean_image, torch.ones(c, 1, 1))
        mean = mean_image.mean((1, 2))
        var = total_sq / (n * images.shape[2] * images.shape[3]) - mean**2
        return cls(mean.view(c, 1, 1), var.sqrt().view(c, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std


def pad_crop_flip(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, shard: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """The paper's CIFAR augmentation on a whole batch: zero-pad, random crop, random h-flip.

    With shard=(rank, world), x is that rank's share of a global batch `world` times larger:
    the draws are the global batch's, so the shards together are augmented as the whole.
    """
    b, c, h, w = x.shape
    rank, world = shard
    mine = slice(rank * b, (rank + 1) * b)
    padded = F.pad(x, (pad, pad, pad, pad))
    # Drawn where the generator is (the CPU, for BatchStream) and moved: one small copy a step
    # buys the same crops on every kind of device. From pinned memory, so that the copy does
    # not wait for the GPU's work queued before it.
    where = generator.device
    dy = torch.randint(0, 2 * pad + 1, (b * world,), device=where, generator=generator)[mine]
    dx = torch.randint(0, 2 * pad + 1, (b * world,), device=where, generator=generator)[mine]
    flip = torch.rand(b * world, device=where, generator=generator)[mine] < 0.5
    if where != x.device:
        draws = torch.stack([dy, dx, flip.long()])
        if where.type == "cpu" and x.device.type == "cuda":
            draws = draws.pin_memory()
        dy, dx, flip = draws.to(x.device, non_blocking=draws.is_pinned()).unbind()
        flip = flip.bool()
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols[:, None, None, :]]


class BatchStream:
    """Training batches by iteration number: epoch-wise shuffles, augmentation on the device.

    With shard=(rank, world), batch() gives that rank's contiguous share of the global batch
    of batch_size images; the shares of all ranks together are the single-process batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        preprocess: Preprocess,
        batch_size: int,
        seed: int,
        augment: bool = True,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if images.shape[0] < batch_size:
            raise ValueError(
                f"the training set has {images.shape[0]} images, fewer than one batch of "
                f"{batch_size}; lower --batch-size"
            )
        if batch_size % shard[1]:
            raise ValueError(
                f"--batch-size {batch_size} does not split evenly over {shard[1]} processes; "
                f"choose a multiple of {shard[1]}"
            )
        self.images, self.labels = images, labels
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.channels_last = channels_last
        self.shard = shard
        # Every step sees a full batch (BN statistics); the remainder waits for the next epoch.
        self.steps_per_epoch = images.shape[0] // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def _generator(self, stream: int, key: int) -> torch.Generator:
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + stream * 7_919 + key) % (2**63)
        )

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented, normalised batch (this rank's share) of an iteration, and its labels."""
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = self._generator(0, epoch)
            self._order = torch.randperm(self.images.shape[0], generator=gen).to(self.images.device)
            self._epoch = epoch
        rank, world = self.shard
        share = self.batch_size // world
        start = step * self.batch_size + rank * share
        index = self._order[start : start + share]
        x = self.preprocess(self.images[index])
        if self.augment:
            x = pad_crop_flip(x, self._generator(1, iteration), shard=self.shard)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[index]
