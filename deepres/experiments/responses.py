"""Fig. 7: standard deviation of each 3x3 layer's response, after BN, before addition/ReLU."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

from deepres.data import available_splits, open_dataset
from deepres.data.loader import split_train_val
from deepres.experiments.common import Context, ensure_run, run_result, verdict
from deepres.inference import load
from deepres.models import BasicBlock, Bottleneck


def default_models(budget: str) -> list[str]:
    """The nets of Fig. 7."""
    return ["plain20", "plain56", "resnet20", "resnet56", "resnet110"]


def response_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BN after every 3x3 conv, in layer order: the stem's and each block's.

    Fig. 7 is of CIFAR nets, whose stem is a 3x3 conv; an ImageNet net's 7x7 stem is left out.
    """
    layers = [model.bn1] if model.conv1.kernel_size == (3, 3) else []
    for m in model.modules():
        if isinstance(m, BasicBlock):
            layers += [m.bn1, m.bn2]
        elif isinstance(m, Bottleneck):
            layers.append(m.bn2)
    return layers


@torch.no_grad()
def layer_stds(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Std of each layer's response over all images, channels and positions, via hooks."""
    layers = response_layers(model)
    sums = torch.zeros(len(layers), 3, dtype=torch.float64)

    def hook(i):
        def record(module, inputs, output):
            # Read now: the in-place ReLU that follows a BN overwrites its output later.
            x = output.double()
            sums[i] += torch.stack([torch.tensor(x.numel()), x.sum(), (x * x).sum()])

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    n, s, ss = sums.unbind(1)
    return ((ss / n - (s / n) ** 2).clamp(min=0).sqrt()).tolist()


def run(ctx: Context, models: list[str]) -> dict:
    """Train (or reuse) the nets, then measure their responses on the evaluation images."""
    runs = {name: run_result(ensure_run(ctx, ctx.config(name, name))) for name in models}
    if ctx.val_split:
        dataset = open_dataset(ctx.data, "train")
        images = dataset.images[split_train_val(len(dataset.labels), ctx.val_split)[1]]
        which = "validation"
    elif "test" in available_splits(ctx.data):
        images, which = open_dataset(ctx.data, "test").images, "test"
    else:
        # Trained on every image with no test split at hand: a fixed 10,000 of the training
        # images, un-augmented, as many as the test set the paper measured on.
        dataset = open_dataset(ctx.data, "train")
        n = min(10_000, len(dataset.labels) - 1)
        images, which = dataset.images[split_train_val(len(dataset.labels), n)[1]], "training"
    responses = {}
    for name in models:
        classifier = load(runs[name]["run"])
        batches = (classifier.preprocess(chunk) for chunk in images.split(500))
        responses[name] = layer_stds(classifier.model, batches)
    return {
        "runs": runs,
        "responses": responses,
        "claims": claims(responses),
        "n_images": len(images),
        "response_images": which,
    }


def claims(responses: dict) -> list[dict]:
    """Fig. 7's claims: ResNets respond more weakly than plain nets, deeper ones more weakly."""
    mean = {n: sum(v) / len(v) for n, v in responses.items()}
    out = []
    for name in responses:
        twin = "plain" + name[len("resnet") :]
        if name.startswith("resnet") and twin in responses:
            out.append(
                verdict(
                    f"{name} responds more weakly than {twin} (mean std over layers)",
                    mean[name] < mean[twin],
                    f"{mean[name]:.3f} vs {mean[twin]:.3f}",
                )
            )
    resnets = sorted(
        (n for n in responses if n.startswith("resnet")), key=lambda n: int(n[len("resnet") :])
    )
    if len(resnets) >= 2:
        # At every step of depth, as Fig. 7 shows ResNet-20, 56 and 110: not the ends alone.
        steps = list(itertools.pairwise(resnets))
        out.append(
            verdict(
                f"the deeper ResNet responds more weakly at each step from {resnets[0]} to "
                f"{resnets[-1]}",
                all(mean[deeper] < mean[shallower] for shallower, deeper in steps),
                ", ".join(f"{n} {mean[n]:.3f}" for n in resnets),
            )
        )
    return out
