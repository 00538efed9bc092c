"""Peak resident memory of a training run at batch 128, one fresh process per case.

Each case (the `bench.bench_train` case names) runs in its own Python process, so the figure
is what a training process needs: TensorFlow and Keras loaded, the model built and compiled,
`--steps` `model.fit` steps on the synthetic 32x32 batches of `bench.bench_train`. Reported:
the process's resident set after building the model, and its peak (VmHWM) by the end.

Usage:
    python -m bench.bench_memory --cases=ours-imagenet-f32,ours-imagenet-bf16
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys

from absl import flags

from app import cli
from bench import common, train_cases

DEFAULT_CASES = (
    "ours-imagenet-f32",
    "keras-imagenet-f32",
    "ours-imagenet-bf16+mm+fbn",
    "ours-cifar-f32",
)
_MARK = "MEMORY_JSON "


@dataclasses.dataclass(frozen=True)
class Memory:
    """Resident memory of one training process, in MiB."""

    case: str
    after_build_mib: float
    peak_mib: float
    seconds: float


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    Linux: VmHWM of /proc/self/status, the high-water mark of this address space. Not
    `ru_maxrss`: Linux keeps that across fork and exec, so a child of a big process (as under
    `bench.run_all`) reports its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    # Elsewhere: ru_maxrss is KiB on Linux-likes, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(case_name: str, batch_size: int, steps: int) -> dict:
    """Runs in the measured process: build, compile, `steps` fit steps; returns the figures."""
    import time

    import psutil

    from bench import bench_train

    start = time.perf_counter()
    case = train_cases.Case.parse(case_name)
    model = bench_train.build_model(case)
    bench_train.compile_model(model, case)
    after_build = psutil.Process().memory_info().rss
    ds = bench_train.synthetic_dataset(batch_size)
    model.fit(ds, steps_per_epoch=steps * case.steps_per_execution, epochs=1, verbose=0)
    peak = peak_rss_bytes()
    return {
        "case": case_name,
        "after_build_mib": after_build / 2**20,
        "peak_mib": peak / 2**20,
        "seconds": time.perf_counter() - start,
    }


def measure(
    cases: tuple[str, ...] = DEFAULT_CASES, batch_size: int = 128, steps: int = 2, log=print
) -> list[Memory]:
    """Runs each case in a fresh `python -m bench.bench_memory --child` process."""
    from common.errors import UsageError

    for name in cases:
        train_cases.Case.parse(name)  # a bad name fails here, before any process starts
    results = []
    for name in cases:
        command = [
            sys.executable,
            "-m",
            "bench.bench_memory",
            "--child",
            f"--cases={name}",
            f"--batch_size={batch_size}",
            f"--steps={steps}",
        ]
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UsageError(f"memory run of {name} failed (exit {done.returncode}): {tail}")
        result = Memory(**json.loads(lines[-1][len(_MARK) :]))
        results.append(result)
        if log:
            log(
                f"  {name}: {result.after_build_mib:.0f} MiB after build, "
                f"peak {result.peak_mib:.0f} MiB ({result.seconds:.0f}s)"
            )
    return results


def report(results: list[Memory], batch_size: int = 128) -> str:
    """Markdown table of `measure`'s results."""

    rows = []
    for r in results:
        model, stem, settings = train_cases.describe(train_cases.Case.parse(r.case))
        rows.append(
            (
                model,
                stem,
                settings,
                f"{r.after_build_mib:,.0f}",
                f"{r.peak_mib:,.0f}",
                f"{r.peak_mib - r.after_build_mib:,.0f}",
            )
        )
    return common.table(
        [
            "model",
            "input",
            "settings",
            "RSS after build, MiB",
            f"peak RSS training batch {batch_size}, MiB",
            "training adds, MiB",
        ],
        rows,
    )


def define_flags() -> None:
    flags.DEFINE_list("cases", list(DEFAULT_CASES), "bench.bench_train case names.")
    flags.DEFINE_integer("batch_size", 128, "Images per training step.", lower_bound=1)
    flags.DEFINE_integer("steps", 2, "Training steps per process.", lower_bound=1)
    flags.DEFINE_boolean("child", False, "Internal: be the measured process of one case.")


def main(argv: list[str]) -> None:
    del argv

    def flag(name: str):
        return flags.FLAGS[name].value

    if flag("child"):
        print(_MARK + json.dumps(child(flag("cases")[0], flag("batch_size"), flag("steps"))))
        return
    print(common.environment())
    results = measure(tuple(flag("cases")), flag("batch_size"), flag("steps"))
    print(report(results, flag("batch_size")))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
