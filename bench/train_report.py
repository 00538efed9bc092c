"""The Markdown table of `bench.bench_train` results: images/s, CPU time, FLOPs and MFU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench import common

if TYPE_CHECKING:
    from bench import bench_train


def describe(case: bench_train.Case) -> tuple[str, str, str]:
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
    results: list[bench_train.Result], peaks: dict[str, common.Peak], baseline: str | None = None
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
