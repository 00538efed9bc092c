"""Every benchmark in one run: prints the tables and writes bench/results.md (`make bench`).

Sections: training throughput of our ResNet-50 against keras.applications.ResNet50 (32x32
with the ImageNet stem; the CIFAR stem against keras.applications fed the same batches
resized to 128x128), with MFU against matmul peaks measured in the same run; `make train`'s
recipe in `fit` on real data against its bare step (`bench.profile_fit`); the input
pipeline against the training step (`bench.bench_data`), and every data source (memory, an
image folder, streamed shards and TFDS) against the default recipe's step
(`bench.bench_sources`); inference in every exported form;
peak memory of a training run. About 11 minutes on the idle 2-core development machine.

Usage:
    python -m bench.run_all
    python -m bench.run_all --sections=train,memory --output=/tmp/results.md
"""

from __future__ import annotations

import os
import time

from absl import flags, logging

from app import cli
from bench import common, train_cases

SECTIONS = ("train", "train_cifar", "fit", "data", "inference", "memory")
# The plain reference of the issue: keras.applications.ResNet50 in model.fit, float32.
BASELINE = "keras-imagenet-f32"
# Ours with stock Keras layers: what the two layers of models/layers.py give, same run.
ABLATION_CASES = ("ours-imagenet-f32", "ours-imagenet-bf16")
TARGET_SPEEDUP = 1.5
# The recipe `make train` runs, for the fit section.
FIT_RECIPE = "app/configs/cifar10_cpu_quick.flags"
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md")


def train_section(repeats: int):
    """Measures now; returns a function that renders the section once the peaks are final."""
    from bench import bench_train

    names = (*train_cases.MAIN_CASES, *ABLATION_CASES)
    cases = [train_cases.Case.parse(name) for name in names]
    results = bench_train.measure(cases, warmup_steps=2, steps=3, repeats=repeats)
    by_name = {r.case.name: r.images_per_s.median for r in results}
    best = max(train_cases.MAIN_CASES[::2], key=by_name.__getitem__)
    speedup = by_name[best] / by_name[BASELINE]
    verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
    slower = [
        f"{ours} ({by_name[ours]:.0f} vs {by_name[keras]:.0f} images/s)"
        for ours, keras in zip(
            train_cases.MAIN_CASES[::2], train_cases.MAIN_CASES[1::2], strict=True
        )
        if by_name[ours] < by_name[keras]
    ]

    def render(peaks) -> str:
        return "\n".join(
            [
                "### Training, 32x32, ImageNet stem (batch 128, SGD momentum, synthetic batches)",
                "",
                train_cases.report(results, peaks, BASELINE),
                "",
                f"Fastest: `{best}`, {speedup:.2f}x plain keras.applications.ResNet50 "
                f"`model.fit` float32 ({verdict} the {TARGET_SPEEDUP}x target). "
                "Ours slower than keras.applications in: " + ("; ".join(slower) or "no row") + ".",
            ]
        )

    return render


def train_cifar_section(repeats: int):
    """As `train_section`, for the CIFAR stem."""
    from bench import bench_train

    cases = [train_cases.Case.parse(name) for name in train_cases.CIFAR_CASES]
    # One step is 3-10 s here: single-step measurements are long enough to be steady.
    results = bench_train.measure(cases, warmup_steps=1, steps=1, repeats=repeats)

    def render(peaks) -> str:
        return "\n".join(
            [
                "### Training, CIFAR stem (32x32 feature maps into conv2)",
                "",
                "keras.applications has no CIFAR stem; the comparable run feeds it the same "
                "32x32 batches resized to 128x128 inside the model, which gives its stages the "
                "same 32/16/8/4 feature maps (its 7x7/2 stem and max-pool cost a little more).",
                "",
                train_cases.report(results, peaks, "keras-up128-f32"),
            ]
        )

    return render


def fit_section() -> str:
    """`make train`'s recipe in `fit` on real data against its bare step (`bench.profile_fit`,
    in its own process: `app.training.train` must configure TensorFlow first)."""
    import subprocess
    import sys
    import tempfile

    from common.errors import UsageError

    data_dir = common.default_data_dir()
    if not os.path.isdir(os.path.expanduser(data_dir)):
        raise UsageError(
            f"the fit section trains on real CIFAR-10, not found at {data_dir}: "
            "make bench DATA_DIR=DIR, or leave fit out of --sections"
        )
    with tempfile.TemporaryDirectory(prefix="profile_fit-") as tmp:
        report = os.path.join(tmp, "report.md")
        command = [
            sys.executable,
            "-m",
            "bench.profile_fit",
            f"--flagfile={FIT_RECIPE}",
            f"--data_dir={data_dir}",
            "--epochs=2",
            "--verbose=0",
            f"--model_dir={os.path.join(tmp, 'run')}",
            f"--trace_dir={os.path.join(tmp, 'trace')}",
            f"--report={report}",
        ]
        subprocess.run(command, check=True)
        with open(report) as f:
            tables = f.read().strip()
    return "\n".join(
        [
            f"### `fit` on real data vs the bare step (`python -m bench.profile_fit "
            f"--flagfile={FIT_RECIPE} --epochs=2 --trace_dir=...`)",
            "",
            tables,
        ]
    )


def data_section() -> str:
    from bench import bench_data, bench_sources

    rows = bench_data.main()  # prints its own table and verdict as it goes
    parts = [
        "### Input pipeline vs training step (`python -m bench.bench_data`)",
        "",
        bench_data.report(rows),
    ]
    data_dir = common.default_data_dir()
    if os.path.isdir(data_dir):  # real images to convert: the sources' rows
        parts += [
            "",
            "### Every data source vs the default recipe's step (`python -m bench.bench_sources`)",
            "",
            bench_sources.report(bench_sources.main(data_dir)),
        ]
    else:
        parts += ["", f"(`bench.bench_sources` skipped: no CIFAR-10 images at {data_dir})"]
    return "\n".join(parts)


def inference_section() -> str:
    from bench import bench_inference

    rows = bench_inference.measure(
        bench_inference.default_bundle(), data_dir=bench_inference.DEFAULT_DATA_DIR
    )
    return "\n".join(
        [
            "### Inference (untrained ResNet-50, ImageNet stem, 32x32; "
            "`python -m bench.bench_inference`)",
            "",
            bench_inference.report(rows),
        ]
    )


def memory_section() -> str:
    from bench import bench_memory

    results = bench_memory.measure()
    return "\n".join(
        [
            "### Peak memory of a training process (`python -m bench.bench_memory`)",
            "",
            bench_memory.report(results),
        ]
    )


def define_flags() -> None:
    flags.DEFINE_list("sections", list(SECTIONS), f"Some of {','.join(SECTIONS)}.")
    flags.DEFINE_integer("repeats", 3, "Measurements per training case.", lower_bound=1)
    flags.DEFINE_string("output", DEFAULT_OUTPUT, "Markdown file written at the end.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # TensorFlow's SavedModel writer logs every file
    from common.errors import UsageError
    from common.files import write_text

    sections = flags.FLAGS["sections"].value
    repeats = flags.FLAGS["repeats"].value
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise UsageError(f"--sections: unknown {unknown[0]!r}; choose from {','.join(SECTIONS)}")
    started = time.perf_counter()
    header = common.environment()
    print(header)
    peaks = {}
    if "train" in sections or "train_cifar" in sections:
        peaks = common.measure_peaks()
    builders = {
        "train": lambda: train_section(repeats),
        "train_cifar": lambda: train_cifar_section(repeats),
        "fit": fit_section,
        "data": data_section,
        "inference": inference_section,
        "memory": memory_section,
    }
    parts = []
    for name in SECTIONS:
        if name not in sections:
            continue
        section_start = time.perf_counter()
        print(f"\n== {name}", flush=True)
        parts.append((builders[name](), time.perf_counter() - section_start))
    if peaks:
        # Again at the end: MFU is measured against the best of both.
        peaks = common.best_peaks(peaks, common.measure_peaks())
    texts = []
    for part, seconds in parts:
        text = part if isinstance(part, str) else part(peaks)
        print(f"\n{text}")
        texts.append(f"{text}\n\n({seconds:.0f} s)")
    total = time.perf_counter() - started
    peak_line = ""
    if peaks:
        peak_line = (
            "Matmul peaks in this run (4096x4096x4096, best of 5 at the start and 5 at the "
            f"end): {common.describe_peaks(peaks)}."
        )
    text = "\n\n".join(
        [
            "# Benchmark results",
            f"`python -m bench.run_all` ({total / 60:.1f} min). {header} "
            f"Load average {common.load_average()} at the end.",
            peak_line,
            *texts,
        ]
    )
    write_text(flags.FLAGS["output"].value, text + "\n")
    print(f"\nwrote {flags.FLAGS['output'].value} ({total / 60:.1f} min)")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
