"""Training throughput of our ResNet-50 against keras.applications.ResNet50, same feed.

Every case is compiled the same way (SGD momentum 0.9, sparse cross-entropy on logits,
accuracy metric) and fed the same `tf.data` pipeline (a fixed pool of random 32x32 images,
already normalised, batched, cached and prefetched: the model is what is timed; the input
pipeline has its own benchmark, `bench.bench_data`). All cases of one run live in one
process and are measured in turns (A, B, C, A, B, C, ...), so a neighbour's burst of CPU use
hits all of them alike; each figure is the median of `--repeats` measurements of `--steps`
steady-state steps after `--warmup_steps` untimed ones.

Cases are written as `bench.train_cases` says, e.g. `ours-imagenet-bf16+mm+fbn`.

Usage:
    python -m bench.bench_train --cases=ours-imagenet-f32,keras-imagenet-f32 --repeats=3
    TF_ENABLE_ONEDNN_OPTS=0 python -m bench.bench_train --cases=ours-imagenet-bf16
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import flags

from app import cli
from bench import common, train_cases
from bench.train_cases import IMAGE_SIZE, MAIN_CASES, NUM_CLASSES, Case, Result


def build_model(case: Case):
    """Builds the case's model under its precision policy (the global policy is restored)."""
    import keras

    from bench import variants

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(case.policy)
    try:
        return variants.convert(_build(case), case.matmul_convs, case.fused_bn)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _build(case: Case):
    import keras

    from models import resnet

    previous = keras.mixed_precision.global_policy()
    previous_format = keras.config.image_data_format()
    keras.mixed_precision.set_global_policy(case.policy)
    try:
        if case.model != "keras":
            return resnet.build(
                "resnet18" if case.model == "ours18" else "resnet50",
                num_classes=NUM_CLASSES,
                input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                stem=case.stem,
                stride_on="1x1" if case.stride_on_1x1 else "3x3",
            )
        size = 128 if case.stem == "up128" else IMAGE_SIZE
        if case.channels_first:
            keras.config.set_image_data_format("channels_first")
        inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="images")
        x = inputs
        if size != IMAGE_SIZE:
            x = keras.layers.Resizing(size, size, name="upsample")(x)
        if case.channels_first:
            x = keras.layers.Permute((3, 1, 2), name="to_nchw")(x)
        shape = (3, size, size) if case.channels_first else (size, size, 3)
        # classifier_activation=None: logits, like ours, so both use the same loss.
        net = keras.applications.ResNet50(
            weights=None, input_shape=shape, classes=NUM_CLASSES, classifier_activation=None
        )
        return keras.Model(inputs, net(x), name=f"keras_resnet50_{case.stem}")
    finally:
        keras.mixed_precision.set_global_policy(previous)
        keras.config.set_image_data_format(previous_format)


def compile_model(model, case: Case) -> None:
    """The one training setup every case shares (as app.train compiles)."""
    import keras

    from app.training.recipe import FusedSGD

    sgd = FusedSGD if case.fused_sgd else keras.optimizers.SGD
    model.compile(
        optimizer=sgd(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=case.jit_compile,
        steps_per_execution=case.steps_per_execution,
    )


def synthetic_dataset(batch_size: int, pool: int = 8, seed: int = 0):
    """`pool` distinct batches of random normalised 32x32 images and labels, repeated."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = pool * batch_size
    images = rng.standard_normal((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds.batch(batch_size, drop_remainder=True).cache().repeat().prefetch(tf.data.AUTOTUNE)


class _StepClock:
    """Keras callback: wall and CPU time from the start of the first execution of a `fit` to
    the end of each later one (so iterator start-up before the first step is left out)."""

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(cb, batch, logs=None):
                if not self.marks:
                    self.marks.append((batch, time.perf_counter(), common.cpu_seconds()))

            def on_train_batch_end(cb, batch, logs=None):
                self.marks.append((batch + 1, time.perf_counter(), common.cpu_seconds()))

        self.callback = Callback()
        self.marks: list[tuple[int, float, float]] = []

    def rates(self, batch_size: int) -> tuple[float, float]:
        """(images/s, CPU-s per image) between the first and last mark."""
        (s0, t0, c0), (s1, t1, c1) = self.marks[0], self.marks[-1]
        images = (s1 - s0) * batch_size
        return images / (t1 - t0), (c1 - c0) / images


def measure(
    cases: list[Case],
    batch_size: int = 128,
    warmup_steps: int = 3,
    steps: int = 4,
    repeats: int = 3,
    log=print,
) -> list[Result]:
    """Times `model.fit` of every case, in turns; see the module docstring.

    Args:
        cases: what to time (all built in this process).
        batch_size: images per step.
        warmup_steps: untimed steps after tracing, per case.
        steps: timed steps per measurement (rounded up to whole executions).
        repeats: measurements per case.
        log: progress printer (None for silence).

    Returns:
        One `Result` per case, in the order given.
    """
    ds = synthetic_dataset(batch_size)
    models, compile_s = [], []
    for case in cases:
        start = time.perf_counter()
        model = build_model(case)
        compile_model(model, case)
        spe = case.steps_per_execution
        # The first fit traces and compiles the step function.
        model.fit(ds, steps_per_epoch=max(warmup_steps, 1) * spe, epochs=1, verbose=0)
        compile_s.append(time.perf_counter() - start)
        models.append(model)
        if log:
            log(f"  {case.name}: built, compiled and warmed up in {compile_s[-1]:.0f}s")
    wall: list[list[float]] = [[] for _ in cases]
    cpu: list[list[float]] = [[] for _ in cases]
    for r in range(repeats):
        for i, (case, model) in enumerate(zip(cases, models, strict=True)):
            spe = case.steps_per_execution
            executions = -(-steps // spe)
            clock = _StepClock()
            model.fit(
                ds,
                steps_per_epoch=executions * spe,
                epochs=1,
                verbose=0,
                callbacks=[clock.callback],
            )
            images_per_s, cpu_per_image = clock.rates(batch_size)
            wall[i].append(images_per_s)
            cpu[i].append(cpu_per_image)
            if log:
                log(f"  [{r + 1}/{repeats}] {case.name}: {images_per_s:.1f} images/s")
    return [
        Result(case, common.Stats.of(w), common.Stats.of(c), common.training_flops(m), s)
        for case, w, c, m, s in zip(cases, wall, cpu, models, compile_s, strict=True)
    ]


def define_flags() -> None:
    flags.DEFINE_list("cases", list(MAIN_CASES), "Cases to time, in turns (see bench.train_cases).")
    flags.DEFINE_integer("batch_size", 128, "Images per training step.", lower_bound=1)
    flags.DEFINE_integer("warmup_steps", 3, "Untimed steps per case after compiling.")
    flags.DEFINE_integer("steps", 4, "Timed steps per measurement.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Measurements per case (the median is reported).")
    flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads (0: default).")
    flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: default).")
    flags.DEFINE_string("baseline", None, "Case the speed-up column is relative to.")
    flags.DEFINE_string("json_out", None, "Also write the results as JSON to this file.")


def main(argv: list[str]) -> None:
    del argv

    def flag(name: str):
        return flags.FLAGS[name].value

    cases = [Case.parse(name) for name in flag("cases")]
    common.configure_threads(flag("intra_op_threads"), flag("inter_op_threads"))
    print(common.environment())
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    intra, inter = flag("intra_op_threads") or "default", flag("inter_op_threads") or "default"
    threads = f"intra={intra} inter={inter}"
    print(f"TF_ENABLE_ONEDNN_OPTS={onednn}, threads {threads}")
    peaks = common.measure_peaks()
    results = measure(
        cases,
        batch_size=flag("batch_size"),
        warmup_steps=flag("warmup_steps"),
        steps=flag("steps"),
        repeats=flag("repeats"),
    )
    peaks = common.best_peaks(peaks, common.measure_peaks())
    print(train_cases.report(results, peaks, flag("baseline")))
    if flag("json_out"):
        from common.files import write_text

        rows = [
            {
                "case": r.case.name,
                "images_per_s": dataclasses.asdict(r.images_per_s),
                "cpu_s_per_image": dataclasses.asdict(r.cpu_s_per_image),
                "train_flops_per_image": r.train_flops_per_image,
                "compile_s": r.compile_s,
            }
            for r in results
        ]
        payload = {
            "peaks": {k: dataclasses.asdict(p) for k, p in peaks.items()},
            "onednn": onednn,
            "threads": threads,
            "results": rows,
        }
        write_text(flag("json_out"), json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
