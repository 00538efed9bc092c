"""The cases `bench.bench_train` times, their results, and the Markdown table of them.

A case is written `<model>-<stem>-<precision>[+option...]`:
  model      ours (models.resnet.resnet50) | ours18 (resnet18, the quick recipe's model) |
             keras (keras.applications.ResNet50, weights=None, no softmax)
  stem       imagenet (32x32 input) | cifar, cifar_pool (ours only) | up128 (keras only: the 32x32
             batch resized to 128x128 inside the model, so its stages see the same
             32/16/8/4 feature maps as our CIFAR stem)
  precision  f32 | bf16 (mixed_bfloat16)
  options    xla (compile(jit_compile=True)), spe<N> (steps_per_execution=N),
             v1 (ours with the stride on the 1x1 conv, as keras.applications),
             nchw (keras only: channels_first layout),
             mm (1x1 and other matmul-shaped convolutions as one matmul:
                 models.layers.MatmulConv2D),
             fbn (batch norm through TensorFlow's fused kernel in training:
                 models.layers.FusedBatchNormalization),
             fsgd (the SGD momentum update in one kernel per variable, as app.train
                 runs it: app.training.recipe.FusedSGD; without it Keras' SGD)
             Without mm/fbn a case has stock Conv2D/BatchNormalization layers, ours included
             (`models.resnet` itself builds with both: ours-...+mm+fbn is what app.train runs).
"""

from __future__ import annotations

import dataclasses
import re

from bench import common

# The comparison of the issue, pairwise: ours (as models.resnet builds it) and keras.applications,
# both stems, both precisions.
MAIN_CASES = (
    "ours-imagenet-f32+mm+fbn",
    "keras-imagenet-f32",
    "ours-imagenet-bf16+mm+fbn",
    "keras-imagenet-bf16",
)
CIFAR_CASES = (
    "ours-cifar-f32+mm+fbn",
    "keras-up128-f32",
    "ours-cifar-bf16+mm+fbn",
    "keras-up128-bf16",
)
NUM_CLASSES = 10
IMAGE_SIZE = 32
_POLICIES = {"f32": "float32", "bf16": "mixed_bfloat16"}
_CASE = re.compile(
    r"^(ours|ours18|keras)-(imagenet|cifar|cifar_pool|up128)-(f32|bf16)((?:\+[a-z0-9]+)*)$"
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One training configuration to time."""

    name: str
    model: str
    stem: str
    policy: str
    jit_compile: bool = False
    steps_per_execution: int = 1
    stride_on_1x1: bool = False
    channels_first: bool = False
    matmul_convs: bool = False
    fused_bn: bool = False
    fused_sgd: bool = False

    @classmethod
    def parse(cls, name: str) -> Case:
        """Parses `ours-imagenet-bf16+xla+spe8`; raises UsageError on a bad name."""
        from common.errors import UsageError

        match = _CASE.match(name)
        if not match:
            raise UsageError(
                f"bad case {name!r}: write <ours|ours18|keras>-"
                "<imagenet|cifar|cifar_pool|up128>-<f32|bf16>[+xla][+spe<N>][+v1][+nchw][+mm][+fbn][+fsgd]"
            )
        model, stem, precision, options = match.groups()
        keras_model = model == "keras"
        if (keras_model and stem.startswith("cifar")) or (not keras_model and stem == "up128"):
            raise UsageError(f"bad case {name!r}: cifar stems are ours only, up128 keras only")
        kwargs: dict = {}
        for option in filter(None, options.split("+")):
            if option == "xla":
                kwargs["jit_compile"] = True
            elif option == "v1" and model != "keras":
                kwargs["stride_on_1x1"] = True
            elif option == "nchw" and model == "keras":
                kwargs["channels_first"] = True
            elif option == "mm":
                kwargs["matmul_convs"] = True
            elif option == "fbn":
                kwargs["fused_bn"] = True
            elif option == "fsgd":
                kwargs["fused_sgd"] = True
            elif re.fullmatch(r"spe[1-9][0-9]*", option):
                kwargs["steps_per_execution"] = int(option[3:])
            else:
                raise UsageError(f"bad case {name!r}: unknown option {option!r}")
        return cls(name, model, stem, _POLICIES[precision], **kwargs)


@dataclasses.dataclass(frozen=True)
class Result:
    """Throughput of one case: images/s (wall clock) and CPU-seconds per image."""

    case: Case
    images_per_s: common.Stats
    cpu_s_per_image: common.Stats
    train_flops_per_image: int
    compile_s: float


def describe(case: Case) -> tuple[str, str, str]:
    """(model, input/stem, settings) columns for a table."""
    model = {
        "ours": "ours resnet50",
        "ours18": "ours resnet18",
        "keras": "keras.applications.ResNet50",
    }[case.model]
    if case.stride_on_1x1:
        model += " (stride on 1x1)"
    stem = {
        "imagenet": "32x32, ImageNet stem",
        "cifar": "32x32, CIFAR stem",
        "cifar_pool": "32x32, CIFAR stem + max-pool (16x16 into conv2)",
        "up128": "32x32 resized to 128x128 in the model",
    }[case.stem]
    settings = [case.policy]
    if case.jit_compile:
        settings.append("XLA")
    if case.steps_per_execution > 1:
        settings.append(f"steps_per_execution={case.steps_per_execution}")
    if case.channels_first:
        settings.append("channels_first")
    if case.matmul_convs:
        settings.append("matmul 1x1 convs")
    if case.fused_bn:
        settings.append("fused batch norm")
    if case.fused_sgd:
        settings.append("fused SGD update")
    return model, stem, ", ".join(settings)


def report(
    results: list[Result], peaks: dict[str, common.Peak], baseline: str | None = None
) -> str:
    """Markdown table of `results`; speed-ups are relative to the case named `baseline`.

    MFU is model FLOP/s over the matmul peak of the case's compute type (float32 or
    bfloat16): by wall clock (median images/s), and by CPU time (FLOPs per CPU-second of the
    model over those of the matmul), which a busy machine disturbs far less.
    """
    base = {r.case.name: r for r in results}.get(baseline)
    headers = ["model", "input", "settings", "images/s median (min–max)", "CPU ms/image"]
    headers += ["GFLOP/image (train)", "MFU wall", "MFU CPU-time"]
    if base:
        headers.append(f"x {baseline}")
    rows = []
    for r in results:
        flops = r.train_flops_per_image
        peak = peaks.get("bfloat16" if r.case.policy == "mixed_bfloat16" else "float32")
        mfu_wall = mfu_cpu = "n/a"
        if peak:
            mfu_wall = f"{100 * flops * r.images_per_s.median / peak.flops_per_s:.1f}%"
            mfu_cpu = f"{100 * flops / r.cpu_s_per_image.median / peak.flops_per_cpu_s:.1f}%"
        row = [
            *describe(r.case),
            common.median_range(r.images_per_s),
            f"{1000 * r.cpu_s_per_image.median:.1f}",
            f"{flops / 1e9:.2f}",
            mfu_wall,
            mfu_cpu,
        ]
        if base:
            row.append(f"{r.images_per_s.median / base.images_per_s.median:.2f}")
        rows.append(row)
    return common.table(headers, rows)
