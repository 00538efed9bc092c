"""What every benchmark shares: timing statistics, FLOP counting, peak FLOP/s, tables.

TensorFlow is imported inside the functions, so a program can set thread and oneDNN
environment variables (read once, when TensorFlow loads) before anything imports it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

# Channels-last convolution layers whose cost is a multiply-add per kernel tap.
_CONV_LAYERS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D")


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements of one quantity."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def spread(self) -> float:
        """(high - low) / median: how much the machine disturbed the measurement."""
        return (self.high - self.low) / self.median if self.median else float("nan")


def default_data_dir() -> str:
    """Real CIFAR-10 images (any `app.data` layout): $CIFAR10_DIR, else ~/data/cifar10.

    `make bench DATA_DIR=...` sets CIFAR10_DIR.
    """
    return os.path.expanduser(os.environ.get("CIFAR10_DIR") or "~/data/cifar10")


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), in seconds."""
    t = os.times()
    return t.user + t.system


def forward_flops(model) -> int:
    """Forward FLOPs per example of a Keras model, counted from its layer shapes.

    Convolutions count 2 * (output positions) * (kernel taps) * (input channels / groups) *
    (output channels); Dense layers 2 * inputs * units. Batch norm, activations, pooling and
    additions are left out (they are a few percent and memory-bound), as MFU figures usually
    do. Nested models are counted through.
    """
    import keras

    conv_types = tuple(getattr(keras.layers, name) for name in _CONV_LAYERS)
    total = 0
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:  # a nested Functional/Sequential
            total += forward_flops(layer)
        elif isinstance(layer, conv_types):
            out = layer.output.shape[1:-1]
            cin = layer.input.shape[-1]
            positions = 1
            for d in out:
                positions *= int(d)
            taps = 1
            for k in layer.kernel_size:
                taps *= int(k)
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                cout, per_out = cin * layer.depth_multiplier, 1
            else:
                cout, per_out = layer.filters, cin // getattr(layer, "groups", 1)
            total += 2 * positions * taps * per_out * cout
        elif isinstance(layer, keras.layers.Dense):
            positions = 1
            for d in layer.input.shape[1:-1]:
                positions *= int(d)
            total += 2 * positions * int(layer.input.shape[-1]) * layer.units
    return total


def training_flops(model) -> int:
    """FLOPs of one training step per example: forward + the two backward matmuls (3x)."""
    return 3 * forward_flops(model)


@dataclasses.dataclass(frozen=True)
class Peak:
    """A matmul's FLOP rate: per wall-clock second, and per CPU-second of this process."""

    flops_per_s: float
    flops_per_cpu_s: float


def peak_matmul(dtype: str, n: int = 4096, repeats: int = 5) -> Peak:
    """Best FLOP rate of an n x n x n matmul in `dtype` ("float32" or "bfloat16").

    The best of `repeats` runs, not the median: this is the ceiling the hardware reached, and
    a busy machine only ever lowers it. The per-CPU-second rate barely depends on how busy the
    machine is, so it gives an MFU that neighbours do not disturb.
    """
    import tensorflow as tf

    a = tf.cast(tf.random.stateless_normal((n, n), seed=(1, 2)), dtype)
    b = tf.cast(tf.random.stateless_normal((n, n), seed=(3, 4)), dtype)
    # Reduce to a scalar inside the graph so fetching the result costs nothing.
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)[:1, :1]))
    matmul(a, b).numpy()
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        matmul(a, b).numpy()
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, cpu_seconds() - start_cpu)
    flops = 2 * n**3
    return Peak(flops / best_wall, flops / max(best_cpu, 1e-9))


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Stats:
    """Seconds per call of `fn` (its result ignored): `warmup` untimed calls, then `repeats`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Stats.of(times)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """CPU feature flags (avx512f, amx_bf16, ...) from /proc/cpuinfo; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> str:
    """The 1-minute load average (how busy the machine was), or "n/a"."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def environment() -> str:
    """A markdown paragraph naming the machine and library versions a result belongs to."""
    import keras
    import tensorflow as tf

    flags = cpu_flags()
    isa = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{when}; {cpu_model()}, {os.cpu_count()} cores ({isa or 'no AVX-512/AMX'}); "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python "
        f"{platform.python_version()}; load average {load_average()} at the start."
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (also readable as plain text on a terminal)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median_range(stats: Stats, scale: float = 1.0, digits: int = 0) -> str:
    """`median (low-high)` of `stats` multiplied by `scale`, for a table cell."""
    fmt = f"{{:.{digits}f}}"
    return (
        f"{fmt.format(stats.median * scale)} "
        f"({fmt.format(stats.low * scale)}–{fmt.format(stats.high * scale)})"
    )


def measure_peaks(log=print) -> dict[str, Peak]:
    """Measured matmul FLOP rates of this machine, float32 and bfloat16."""
    peaks = {dtype: peak_matmul(dtype) for dtype in ("float32", "bfloat16")}
    if log:
        log("  peak matmul: " + describe_peaks(peaks))
    return peaks


def best_peaks(*measured: dict[str, Peak]) -> dict[str, Peak]:
    """The best of several peak measurements (a busy machine only lowers them)."""
    return {
        key: Peak(
            max(m[key].flops_per_s for m in measured),
            max(m[key].flops_per_cpu_s for m in measured),
        )
        for key in measured[0]
    }


def describe_peaks(peaks: dict[str, Peak]) -> str:
    return ", ".join(
        f"{key} {p.flops_per_s / 1e9:.0f} GFLOP/s ({p.flops_per_cpu_s / 1e9:.0f} per CPU-s)"
        for key, p in peaks.items()
    )


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Sets TensorFlow's thread pools (0 keeps TensorFlow's choice); before any op runs."""
    import tensorflow as tf

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
