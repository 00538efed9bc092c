"""The TensorFlow runtime, the `tf.distribute` strategy, and the workers of a multi-worker job.

A multi-worker job runs the same program on every worker: the chief writes the run's
files; the others write theirs to a scratch directory removed at the end (running the same
code keeps every collective operation in step). A worker that loses its peers ends with a
`WorkerLostError` that says how to resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import keras

from app.training import workarounds
from app.training.backup import backup_path
from app.training.config import AUTO_PRECISION, PRECISIONS, STRATEGIES, TrainConfig
from common import files
from common.errors import UsageError, first_line

if TYPE_CHECKING:
    import tensorflow as tf


class WorkerLostError(RuntimeError):
    """Another worker of a multi-worker job died or stopped answering."""


# CPU flags (Linux /proc/cpuinfo) of units that compute bfloat16 natively: without them
# oneDNN emulates bf16, and mixed_bfloat16 runs slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"


def cpu_flags(cpuinfo_text: str) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def choose_precision(
    requested: str,
    *,
    cpuinfo_text: str | None,
    gpu_capabilities: list[tuple[int, int]],
    tpu: bool = False,
    qat: bool = False,
) -> tuple[str, str]:
    """The --mixed_precision a run uses, and why (resolves `auto`; others are kept).

    Args:
        requested: the flag's value.
        cpuinfo_text: /proc/cpuinfo's text; None where there is none (macOS, Windows).
        gpu_capabilities: the (major, minor) CUDA compute capability of each GPU.
        tpu: the run is on TPUs (bf16 units).
        qat: quantization-aware training (rounds as int8 does, in float32).

    Returns:
        (one of PRECISIONS, the reason in a few words).
    """
    if requested != AUTO_PRECISION:
        return requested, f"--mixed_precision={requested}"
    if qat:
        return "none", "--qat rounds activations as int8 does, in float32"
    if tpu:
        return "bf16", "TPUs compute in bfloat16"
    if gpu_capabilities:
        if min(gpu_capabilities) >= (8, 0):
            return "bf16", "the GPUs have bf16 units (compute capability 8.0+)"
        return "none", "a GPU without bf16 units (compute capability < 8.0; fp16 may help)"
    if cpuinfo_text is None:
        return "none", "no /proc/cpuinfo to tell whether this CPU has bf16 units"
    units = sorted(cpu_flags(cpuinfo_text) & set(BF16_CPU_FLAGS))
    if units:
        return "bf16", f"this CPU has {' and '.join(units)}"
    return "none", "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower)"


def resolve_precision(config: TrainConfig) -> tuple[str, str]:
    """`choose_precision` for this machine: its /proc/cpuinfo and GPUs."""
    import tensorflow as tf

    cpuinfo = None
    if os.path.isfile(CPUINFO):
        with open(CPUINFO) as f:
            cpuinfo = f.read()
    capabilities = []
    if config.mixed_precision == AUTO_PRECISION and config.strategy != "tpu":
        for gpu in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(gpu)
            capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return choose_precision(
        config.mixed_precision,
        cpuinfo_text=cpuinfo,
        gpu_capabilities=capabilities,
        tpu=config.strategy == "tpu",
        qat=config.qat,
    )


def configure_runtime(config: TrainConfig) -> str:
    """Process-wide TF settings; must run before TensorFlow executes anything.

    Prints the precision the run computes in, and why (its first line).

    Returns:
        The precision used (a key of PRECISIONS; `auto` resolved).
    """
    import tensorflow as tf

    if config.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(config.intra_op_threads)
    if config.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(config.inter_op_threads)
    if config.logical_cpus > 1:
        # Several logical CPU devices let tests run multi-replica code on one machine.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * config.logical_cpus
        )
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    precision, why = resolve_precision(config)
    print(f"Precision: {PRECISIONS[precision]} ({why})", flush=True)
    keras.mixed_precision.set_global_policy(PRECISIONS[precision])
    if config.strategy == "multi_worker_mirrored":
        workarounds.configure_coordination_service(
            config.heartbeat_timeout, config.collective_timeout
        )
    return precision


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy `--strategy` names (see TrainConfig.strategy)."""
    import tensorflow as tf

    name = config.strategy
    # Listing devices initialises TF, after which MultiWorkerMirroredStrategy can no longer
    # configure its collectives: only the single-machine strategies look.
    gpus = [] if name in ("multi_worker_mirrored", "tpu") else tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        # MirroredStrategy() alone takes the GPUs, or only the first CPU: name them all.
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker_mirrored":
        return _multi_worker_strategy(config.collective_timeout)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise UsageError(f"--strategy=tpu: no TPU found ({e})") from e
        return tf.distribute.TPUStrategy(resolver)
    raise UsageError(f"--strategy={name} is unknown; choose one of {STRATEGIES}")


def _multi_worker_strategy(collective_timeout: float) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy over TF_CONFIG's cluster, its failures said in one line."""
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.UnknownError as e:  # e.g. "Could not start gRPC server"
        raise UsageError(
            f"cannot start this worker's server ({first_line(e)}): is its TF_CONFIG "
            "address free and on this machine?"
        ) from e
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as e:
        raise WorkerLostError(
            f"not every worker of TF_CONFIG joined within --collective_timeout="
            f"{collective_timeout:g} s ({first_line(e)}); start all of them"
        ) from e


def check_batch_divides(config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
    """Raises UsageError when the global batch does not split evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise UsageError(
            f"--batch_size={config.batch_size} (the global batch) does not divide over the "
            f"{replicas} replicas of --strategy={config.strategy}; use a multiple of {replicas}"
        )


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several worker processes."""
    import tensorflow as tf

    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and workarounds.in_multi_worker_mode(strategy)


def is_distributed(strategy: tf.distribute.Strategy) -> bool:
    """Whether `fit` gets distributed datasets (several replicas or workers)."""
    return strategy.num_replicas_in_sync > 1 or is_multi_worker(strategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes the run's files and reports (always, on one machine)."""
    return strategy.extended.should_checkpoint


def worker_name(strategy: tf.distribute.Strategy) -> str:
    """`worker 1`, `chief 0`, ...; `worker` outside a multi-worker job."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "worker"
    return f"{resolver.task_type} {resolver.task_id}"


def scratch_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """The throw-away output directory of a non-chief worker: a local temporary folder, also
    when --model_dir is in a bucket (only the chief writes there)."""
    key = hashlib.sha1(files.resolve(model_dir).encode()).hexdigest()[:12]
    task = worker_name(strategy).replace(" ", "")
    return os.path.join(tempfile.gettempdir(), f"app-train-worker-{task}-{key}")


@contextlib.contextmanager
def output_dir(model_dir: str, strategy: tf.distribute.Strategy) -> Iterator[str]:
    """Yields where this worker writes: `model_dir` on the chief, else its scratch directory.

    A scratch directory is emptied before and removed after; its name is fixed per
    (model_dir, task), so a restarted worker also removes what a killed one left behind.
    """
    if is_chief(strategy):
        yield model_dir
        return
    scratch = scratch_dir(model_dir, strategy)
    files.rmtree(scratch)
    try:
        yield scratch
    finally:
        files.rmtree(scratch)


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is TF's way of saying another worker died or stopped answering."""
    import tensorflow as tf

    if isinstance(error, tf.errors.InternalError):  # only when a collective broke
        return "collective" in str(error).lower()
    return isinstance(
        error,
        tf.errors.UnavailableError
        | tf.errors.DeadlineExceededError
        | tf.errors.CancelledError
        | tf.errors.AbortedError,
    )


@contextlib.contextmanager
def lost_workers_reported(strategy: tf.distribute.Strategy, model_dir: str) -> Iterator[None]:
    """Turns a peer's failure in a multi-worker job into a `WorkerLostError` saying what to do."""
    try:
        yield
    except Exception as e:
        if is_multi_worker(strategy) and is_peer_failure(e):
            raise WorkerLostError(
                f"{worker_name(strategy)}: lost contact with another worker "
                f"({type(e).__name__}: {first_line(e)}); restart every worker with the same "
                f"command to resume from the last backup in {backup_path(model_dir)}"
            ) from e
        raise
