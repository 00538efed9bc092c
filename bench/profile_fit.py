"""Where the time of `app.train`'s `fit` goes, next to the same model's bare training step.

Runs the recipe as `app.train` does (augmented tf.data input, validation every epoch,
checkpoint, records, backups, summaries), with one more callback (`training.train`'s
`callbacks`) that stamps every batch, validation and epoch end. Then, in the same process,
the very model `fit` trained (same compiled step, optimizer, precision and batch; the
`fit_model` and `train_dataset` of `train`'s result) is fitted on a few of the real batches
cached in memory, with no callbacks and no validation: the step alone. Prints both rates and
where the recipe's epoch went: steps, the gaps between them (callbacks, input), validation
and the epoch-end work. With `--trace_dir`, a `tf.profiler` trace of `--trace_steps` steps of
the last epoch is written there and its self-time per op type is printed (TensorFlow's own
converter; TensorBoard's profile plugin shows the same trace).

Usage (from the repository root; about 3 minutes on 2 CPU cores):

    python -m bench.profile_fit --flagfile=app/configs/cifar10_cpu_quick.flags \\
        --data_dir=~/data/cifar10 --epochs=2 --model_dir=/tmp/profile_fit \\
        --trace_dir=/tmp/profile_fit_trace
"""

from __future__ import annotations

import itertools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from absl import flags

import app.train as train_program
from app import cli

_STEP_ONLY_STEPS = flags.DEFINE_integer(
    "step_only_steps", 100, "Timed steps of the bare step (after 5 untimed).", lower_bound=10
)
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Write a tf.profiler trace here.")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 10, "Steps in the trace.", lower_bound=1)
_REPORT = flags.DEFINE_string("report", None, "Also write the Markdown tables to this file.")


class Timeline:
    """Wall-clock stamps of every batch, validation and epoch end of a `fit`."""

    def __init__(self, trace_epoch: int | None = None):
        import keras

        self.batches: list[tuple[int, float, float]] = []  # (epoch, begin, end)
        self.tests: list[tuple[int, float, float]] = []
        self.epochs: list[tuple[int, float, float]] = []
        self._epoch, self._begin, self._test = 0, 0.0, 0.0
        self._trace_epoch, self._tracing = trace_epoch, False
        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer._epoch, outer._epoch_begin = epoch, time.perf_counter()

            def on_train_batch_begin(self, batch, logs=None):
                outer._begin = time.perf_counter()
                outer._trace(batch, self.params.get("steps"))

            def on_train_batch_end(self, batch, logs=None):
                outer.batches.append((outer._epoch, outer._begin, time.perf_counter()))

            def on_test_begin(self, logs=None):
                outer._test = time.perf_counter()

            def on_test_end(self, logs=None):
                outer.tests.append((outer._epoch, outer._test, time.perf_counter()))

            def on_epoch_end(self, epoch, logs=None):
                outer._stop_trace()  # an epoch shorter than the trace
                outer.epochs.append((epoch, outer._epoch_begin, time.perf_counter()))

        self.callback = Callback()

    def _trace(self, batch: int, steps: int | None) -> None:
        import tensorflow as tf

        if self._trace_epoch is None or self._epoch != self._trace_epoch:
            return
        first = min(20, (steps or 80) // 4)  # past the epoch's first, slower steps
        if batch == first and not self._tracing:
            tf.profiler.experimental.start(_TRACE_DIR.value)
            self._tracing = True
        elif batch == first + _TRACE_STEPS.value:
            self._stop_trace()

    def _stop_trace(self) -> None:
        import tensorflow as tf

        if self._tracing:
            tf.profiler.experimental.stop()
            self._tracing, self._trace_epoch = False, None


def _step_only(model, dataset, batch_size: int) -> float:
    """Images/s of `model.fit` on 8 real batches cached in memory: the step alone."""
    stamps: list[float] = []
    import keras

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    cached = dataset.take(8).cache().repeat()
    steps = _STEP_ONLY_STEPS.value + 5
    model.fit(cached, steps_per_epoch=steps, epochs=1, callbacks=[Stamp()], verbose=0)
    timed = stamps[5:]
    return (len(timed) - 1) * batch_size / (timed[-1] - timed[0])


def summarize(timeline: Timeline, config, step_only: float, total: float) -> str:
    """Markdown: where the last epoch went, and fit's rate against the bare step's."""
    last = config.epochs - 1  # the first epoch pays for tracing the functions
    (_, epoch_begin, epoch_end), *_ = [e for e in timeline.epochs if e[0] == last]
    batches = [(b, e) for epoch, b, e in timeline.batches if epoch == last]
    steps = np.array([e - b for b, e in batches])
    gaps = np.array([b1 - e0 for (_, e0), (b1, _) in itertools.pairwise(batches)])
    tests = [e - b for epoch, b, e in timeline.tests if epoch == last]
    epoch_seconds = epoch_end - epoch_begin
    images = len(batches) * config.batch_size
    fit_rate = images / epoch_seconds
    rows = [
        ("epoch start -> first step (iterator, input warm-up)", batches[0][0] - epoch_begin),
        ("training steps (batch begin -> end, mid-epoch backups included)", steps.sum()),
        ("between steps (callbacks, input)", gaps.sum()),
        ("validation", sum(tests)),
    ]
    rows.append(
        (
            "epoch end (checkpoint, records, backup, summaries)",
            epoch_seconds - sum(s for _, s in rows),
        )
    )
    lines = [
        f"{config.model}, batch {config.batch_size}, {config.mixed_precision} precision, "
        f"{len(batches)} steps in epoch {last + 1} of {config.epochs}",
        "",
        "| where the epoch went | seconds | share |",
        "| --- | ---: | ---: |",
        *(f"| {label} | {sec:.2f} | {sec / epoch_seconds:.1%} |" for label, sec in rows),
        f"| the epoch | {epoch_seconds:.2f} | 100% |",
        "",
        f"Step median {np.median(steps) * 1e3:.1f} ms (p90 {np.percentile(steps, 90) * 1e3:.1f});"
        f" slowest {', '.join(f'{t:.0f}' for t in np.sort(steps)[-4:][::-1] * 1e3)} ms;"
        f" gap between steps median {np.median(gaps) * 1e3:.2f} ms.",
        "",
        "| measure | images/s |",
        "| --- | ---: |",
        f"| `fit` as app.train runs it (epoch {last + 1}, validation included) | {fit_rate:.0f} |",
        f"| its training steps alone (sum of step times) | {images / steps.sum():.0f} |",
        f"| the bare step (8 cached real batches, no callbacks) | {step_only:.0f} |",
        "",
        f"`fit` / bare step: {fit_rate / step_only:.1%} (whole command {total:.0f} s).",
    ]
    return "\n".join(lines)


def op_table(trace_dir: str, top: int = 12) -> str:
    """Markdown: self-time per op type in the `tf.profiler` trace (TensorFlow's own converter,
    the data TensorBoard's profile plugin shows as framework op stats)."""
    import collections
    import glob
    import json

    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    (path,) = sorted(glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.xplane.pb")))[-1:]
    raw, _ = plugin.xspace_to_tools_data([path], "framework_op_stats", {})
    table = json.loads(raw)[0]
    names = [c["id"] for c in table["cols"]]
    by_type: collections.Counter = collections.Counter()
    for row in table["rows"]:
        values = {n: (c or {}).get("v") for n, c in zip(names, row["c"], strict=True)}
        if values["type"] != "IDLE":
            by_type[values["type"]] += values["total_self_time"]
    busy = sum(by_type.values())
    lines = [
        f"Op self-time in the {_TRACE_STEPS.value} traced steps (all threads, idle left out): "
        f"{busy / 1e3:.0f} ms",
        "",
        "| op type | ms | share |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {v / 1e3:.1f} | {v / busy:.1%} |" for k, v in by_type.most_common(top)]
    return "\n".join(lines)


def define_flags() -> None:
    """app.train's flags (this module's own are defined at import)."""
    train_program.define_flags()


def main(argv: list[str]) -> None:
    from app import data_flags, training
    from common.errors import UsageError
    from common.files import write_text

    cli.no_arguments(argv)
    config = train_program.config_from_flags()
    data_config = data_flags.data_config_from_flags(config.seed)
    timeline = Timeline(trace_epoch=config.epochs - 1 if _TRACE_DIR.value else None)
    start = time.perf_counter()
    result = training.train(
        config, data_config, train_program.flags_text(), callbacks=[timeline.callback]
    )
    total = time.perf_counter() - start
    if result.fit_model is None:
        raise UsageError(f"{config.model_dir} holds a finished run: pass a new --model_dir")
    step_only = _step_only(result.fit_model, result.train_dataset, config.batch_size)
    text = summarize(timeline, config, step_only, total)
    if _TRACE_DIR.value:
        text += "\n\n" + op_table(_TRACE_DIR.value)
    print("\n" + text)
    if _REPORT.value:
        write_text(_REPORT.value, text + "\n")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
