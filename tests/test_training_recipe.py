"""The training library's pieces, in-process: settings, recipe, backups, records, checkpoint.

Settings are checked before any work (each bad value names its flag); the schedule, weight
decay, loss and frozen backbone are what the recipe says; a backup restores every value;
history.csv round-trips; a failed checkpoint write keeps the previous best.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import keras
import numpy as np
import pytest

from app.training import callbacks, runtime, workarounds
from app.training.backup import (
    RunState,
    assign,
    first_difference,
    load_backup,
    read_state,
    save_backup,
)
from app.training.config import (
    TrainConfig,
    check_config,
    resolve_normalization,
    settings_fingerprint,
)
from app.training.plan import effective_steps_per_execution
from app.training.recipe import (
    FusedSGD,
    lr_schedule,
    make_loss,
    make_optimizer,
    set_backbone_frozen,
)
from common.errors import UsageError

# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"lr": -0.1}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"min_lr": 0.5}, "--min_lr"),
        ({"model": "resnet9"}, "--model"),
        ({"strategy": "parameter_server"}, "--strategy"),
        ({"mixed_precision": "int8"}, "--mixed_precision"),
        ({"warmup_epochs": 40}, "--warmup_epochs"),
        ({"label_smoothing": 1.0}, "--label_smoothing"),
        ({"freeze_backbone_epochs": 2}, "--freeze_backbone_epochs"),  # needs --pretrained
        ({"pretrained": "imagenet", "model": "resnet18"}, "--pretrained"),
        ({"pretrained": "/nonexistent/weights.h5"}, "--pretrained"),
        ({"nesterov": True, "momentum": 0.0}, "--nesterov"),
        ({"qat": True}, "--qat"),  # needs a trained --pretrained model
        ({"qat": True, "pretrained": "imagenet"}, "--qat"),
        ({"qat": True, "pretrained": __file__, "mixed_precision": "bf16"}, "--qat"),
        ({"qat_weight": -1.0}, "--qat_weight"),
    ],
)
def test_check_config_names_the_bad_flag(changes, flag):
    config = TrainConfig(model_dir="x", **changes)
    with pytest.raises(UsageError, match=flag):
        check_config(config)


def test_check_config_holds_every_field_to_its_metadata():
    """The choices and bounds in each field's metadata (what app.train's flags enforce) are
    enforced for a TrainConfig built in code too, naming the flag and, for choices, the
    allowed values as the metadata lists them; the defaults pass."""
    assert check_config(TrainConfig(model_dir="x")) is None
    checked = 0
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        bad = {}
        if "choices" in meta:
            bad["not-a-choice"] = ", ".join(meta["choices"])
        if "lower_bound" in meta:
            bad[meta["lower_bound"] - 1] = f">= {meta['lower_bound']}|in \\["
        if "upper_bound" in meta:
            bad[meta["upper_bound"] + 1] = f"{meta['upper_bound']}\\]"
        for value, why in bad.items():
            with pytest.raises(UsageError, match=f"--{field.name}={value} .*({why})"):
                check_config(TrainConfig(model_dir="x", **{field.name: value}))
            checked += 1
    assert checked >= 15


# /proc/cpuinfo excerpts: a Sapphire Rapids server (AMX), a Zen 4 (AVX512-BF16 only), a
# Skylake laptop (AVX2, no bf16 units), an Arm (Graviton 3: bf16 in `Features`, not ours).
CPUINFO_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n"
CPUINFO_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t: amx_bf16\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "gpus", "expected", "why"),
    [
        (CPUINFO_AMX, [], "bf16", "amx_bf16"),
        (CPUINFO_AVX512_BF16, [], "bf16", "avx512_bf16"),
        (CPUINFO_AVX2, [], "none", "neither AMX nor AVX512-BF16"),  # the first CPU's flags
        (CPUINFO_ARM, [], "none", "neither"),
        (None, [], "none", "no /proc/cpuinfo"),
        (CPUINFO_AVX2, [(8, 0), (9, 0)], "bf16", "compute capability 8.0+"),
        (CPUINFO_AMX, [(7, 5)], "none", "compute capability < 8.0"),  # the GPU computes
        (CPUINFO_AMX, [(8, 6), (7, 0)], "none", "compute capability < 8.0"),
    ],
    ids=["amx", "avx512_bf16", "avx2", "arm", "no_cpuinfo", "a100_h100", "t4", "a10_v100"],
)
def test_auto_precision_is_bf16_only_on_hardware_with_bf16_units(cpuinfo, gpus, expected, why):
    precision, reason = runtime.choose_precision(
        "auto", cpuinfo_text=cpuinfo, gpu_capabilities=gpus
    )
    assert (precision, why in reason) == (expected, True), reason


def test_auto_precision_keeps_explicit_values_and_qat_float32():
    for requested in ("none", "bf16", "fp16"):
        got = runtime.choose_precision(requested, cpuinfo_text=CPUINFO_AVX2, gpu_capabilities=[])
        assert got == (requested, f"--mixed_precision={requested}")
    qat = runtime.choose_precision("auto", cpuinfo_text=CPUINFO_AMX, gpu_capabilities=[], qat=True)
    assert qat[0] == "none"
    tpu = runtime.choose_precision("auto", cpuinfo_text=None, gpu_capabilities=[], tpu=True)
    assert tpu[0] == "bf16"
    check_config(TrainConfig(model_dir="x", mixed_precision="auto", qat=True, pretrained=__file__))


def test_multi_worker_without_tf_config_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="TF_CONFIG"):
        check_config(TrainConfig(model_dir="x", strategy="multi_worker_mirrored"))


def test_normalization_follows_the_starting_weights(tmp_path):
    assert resolve_normalization("auto", "none") == "cifar"
    assert resolve_normalization("auto", "imagenet") == "imagenet"
    assert resolve_normalization("cifar", "imagenet") == "cifar"
    # A .keras of ours carries its normalisation in preprocessing.json beside it.
    from models import preprocessing

    preprocessing.imagenet(64).save(str(tmp_path))
    (tmp_path / "best.keras").write_bytes(b"")
    assert resolve_normalization("auto", str(tmp_path / "best.keras")) == "imagenet"


def test_steps_per_execution_divides_the_epoch():
    assert effective_steps_per_execution(8, 351) == 3  # 351 = 3^3 * 13
    assert effective_steps_per_execution(4, 100) == 4
    assert effective_steps_per_execution(10, 7) == 7
    assert effective_steps_per_execution(1, 9) == 1


def test_settings_fingerprint_ignores_runtime_settings():
    from app.data import DataConfig

    a = settings_fingerprint(TrainConfig(model_dir="a"), DataConfig())
    b = settings_fingerprint(
        TrainConfig(model_dir="b", verbose=0, strategy="mirrored"), DataConfig(max_pixels=10)
    )
    c = settings_fingerprint(TrainConfig(model_dir="a", lr=0.2), DataConfig())
    assert a == b
    assert first_difference(a, c) == "lr: 0.1 -> 0.2"


# --- schedule, optimizer, loss ----------------------------------------------------------


def test_cosine_schedule_with_warmup_runs_from_min_to_max_to_min():
    schedule = lr_schedule(0.1, 0.001, total_steps=110, warmup_steps=10)

    def lr(step):
        return float(schedule(step))

    assert lr(0) == pytest.approx(0.001)
    assert lr(5) == pytest.approx(0.001 + 0.5 * 0.099)  # linear warmup
    assert lr(10) == pytest.approx(0.1)
    assert lr(60) == pytest.approx(0.001 + 0.5 * 0.099, rel=1e-4)  # cosine midpoint
    assert lr(110) == pytest.approx(0.001, rel=1e-4)
    assert lr(200) == pytest.approx(0.001, rel=1e-4)


def test_cosine_schedule_without_warmup_starts_at_max():
    schedule = lr_schedule(1e-3, 1e-5, total_steps=40)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(20)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-4)
    assert float(schedule(40)) == pytest.approx(1e-5, rel=1e-4)


def _tiny_model():
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(2, 3, use_bias=True, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="predictions")(x))


def test_weight_decay_skips_batch_norm_and_bias():
    model = _tiny_model()
    for v in model.trainable_variables:  # nonzero everywhere, so decay would show
        v.assign(np.full(v.shape, 0.5, dtype="float32"))
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    optimizer = make_optimizer(0.1, 0.0, False, 0.5, model.trainable_variables)
    zeros = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    optimizer.apply_gradients(zip(zeros, model.trainable_variables, strict=True))
    for v in model.trainable_variables:
        expected = before[v.path] * (1 - 0.1 * 0.5) if len(v.shape) > 1 else before[v.path]
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, err_msg=v.path)
    decayed = sorted(v.path for v in model.trainable_variables if len(v.shape) > 1)
    assert decayed == ["conv/kernel", "predictions/kernel"]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_steps_with_the_asked_momentum_and_nesterov(nesterov):
    """Three steps against the update written out by hand: m = 0.9 m - lr g, then
    w += m (heavy ball) or w += 0.9 m - lr g (Nesterov)."""
    weight = keras.Variable(np.ones((2, 2), "float32"))
    optimizer = make_optimizer(0.1, 0.9, nesterov, 0.0, [weight])
    w, m = np.ones((2, 2)), np.zeros((2, 2))
    for g in (0.5, -1.0, 2.0):
        optimizer.apply_gradients([(np.full((2, 2), g, "float32"), weight)])
        m = 0.9 * m - 0.1 * g
        w = w + (0.9 * m - 0.1 * g if nesterov else m)
        np.testing.assert_allclose(weight.numpy(), w, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_takes_the_same_steps_as_keras_sgd(nesterov):
    """Three steps of the fused kernel against Keras' own SGD, from the same weights."""
    rng = np.random.default_rng(0)
    fused_model, plain_model = _tiny_model(), _tiny_model()
    plain_model.set_weights(fused_model.get_weights())
    fused = make_optimizer(0.1, 0.9, nesterov, 0.01, fused_model.trainable_variables)
    plain = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    plain.exclude_from_weight_decay(
        var_list=[v for v in plain_model.trainable_variables if len(v.shape) <= 1]
    )
    assert isinstance(fused, FusedSGD)
    initial = [v.numpy().copy() for v in fused_model.trainable_variables]
    for _ in range(3):
        grads = [
            rng.normal(size=v.shape).astype("float32") for v in fused_model.trainable_variables
        ]
        fused.apply_gradients(zip(grads, fused_model.trainable_variables, strict=True))
        plain.apply_gradients(zip(grads, plain_model.trainable_variables, strict=True))
    for a, b, start in zip(
        fused_model.trainable_variables, plain_model.trainable_variables, initial, strict=True
    ):
        assert not np.allclose(a.numpy(), start)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(fused))
    assert isinstance(restored, FusedSGD) and restored.nesterov == nesterov

    import tensorflow as tf

    step = tf.function(
        lambda: fused.apply_gradients(zip(grads, fused_model.trainable_variables, strict=True))
    )
    ops = {op.type for op in step.get_concrete_function().graph.get_operations()}
    assert "ResourceApplyKerasMomentum" in ops


def test_smoothed_sparse_loss_equals_categorical_with_smoothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32") * 3
    labels = np.array([0, 4, 2, 2, 1, 3])
    ours = make_loss(0.1)(labels, logits)
    reference = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        np.eye(5)[labels], logits
    )
    np.testing.assert_allclose(float(ours), float(reference), rtol=1e-6)
    plain = make_loss(0.0)
    assert isinstance(plain, keras.losses.SparseCategoricalCrossentropy)
    restored = keras.losses.deserialize(keras.losses.serialize(make_loss(0.2)))
    assert restored.label_smoothing == 0.2


def test_frozen_backbone_trains_only_the_head_with_batch_norm_in_inference_mode():
    from models import resnet

    model = resnet.build("resnet18", num_classes=3, input_shape=(8, 8, 3), stem="cifar")
    set_backbone_frozen(model, True)
    assert sorted(v.path for v in model.trainable_variables) == [
        "predictions/bias",
        "predictions/kernel",
    ]
    bn = model.get_layer("conv1_bn")
    mean = bn.moving_mean.numpy().copy()
    model(np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32"), training=True)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)  # statistics not updated
    set_backbone_frozen(model, False)
    assert len(model.trainable_variables) > 2


# --- backups, records, checkpoint -------------------------------------------------------


def test_backup_round_trip_restores_every_value(tmp_path):
    model = _tiny_model()
    state = RunState(epoch=2, step=5, history=[{"epoch": 1, "loss": 1.5}], best=0.3, best_epoch=1)
    path = str(tmp_path / "backup" / "state.npz")
    save_backup(path, state, {"model": model.variables})
    saved = [v.numpy().copy() for v in model.variables]
    for v in model.variables:
        v.assign(np.zeros(v.shape, v.dtype))
    backup = load_backup(path)
    assert (backup.state.epoch, backup.state.step, backup.state.best) == (2, 5, 0.3)
    assert backup.state.history == state.history
    assert read_state(path).step == 5
    assign(model.variables, backup.arrays["model"], "model", path)
    for v, value in zip(model.variables, saved, strict=True):
        np.testing.assert_array_equal(v.numpy(), value)
    assert os.listdir(tmp_path / "backup") == ["state.npz"]  # no temporary files left


def test_backup_that_does_not_fit_is_a_usage_error(tmp_path):
    path = str(tmp_path / "state.npz")
    model = _tiny_model()
    save_backup(path, RunState(), {"model": model.variables[:-1]})
    backup = load_backup(path)
    with pytest.raises(UsageError, match="does not fit"):
        assign(model.variables, backup.arrays["model"], "model", path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable training backup"):
        load_backup(str(tmp_path / "bad.npz"))
    assert load_backup(str(tmp_path / "absent.npz")) is None


def test_history_csv_round_trips_exactly(tmp_path):
    rows = [
        {"epoch": 1, "loss": 2.0 / 3.0, "accuracy": 0.1, "val_loss": 1e-8, "val_accuracy": 0.5},
        {"epoch": 2, "loss": 0.1 + 0.2, "accuracy": 0.25, "val_loss": 3.0, "val_accuracy": 0.75},
    ]
    path = tmp_path / "history.csv"
    path.write_text(callbacks.history_csv(rows))
    back = callbacks.read_history_csv(str(path))
    assert [r["epoch"] for r in back] == [1, 2]
    assert back[0]["loss"] == 2.0 / 3.0 and back[1]["loss"] == 0.1 + 0.2


def test_epoch_line_matches_the_tutorial_format():
    line = callbacks.format_epoch_line(3, 40, {"loss": 1.5321, "val_accuracy": 0.3861})
    assert line == "Epoch: [ 3/40], Train Loss: 1.532, Val Accuracy: 0.386"


def test_checkpoint_failure_keeps_the_previous_best(tmp_path):
    model = _tiny_model()
    path = str(tmp_path / "best.keras")
    checkpoint = workarounds.AtomicModelCheckpoint(
        path, monitor="val_accuracy", mode="max", save_best_only=True
    )
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_accuracy": 0.2})
    good = pathlib.Path(path).read_bytes()
    keras.saving.load_model(path)  # a complete model file

    def crash(filepath, **kwargs):
        pathlib.Path(filepath).write_bytes(b"half a zip")
        raise OSError("disk full")

    model.save = crash
    with pytest.raises(OSError, match="disk full"):
        checkpoint.on_epoch_end(1, {"val_accuracy": 0.4})
    assert pathlib.Path(path).read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["best.keras"]
    checkpoint.on_epoch_end(2, {"val_accuracy": 0.1})  # not better: nothing written
    assert pathlib.Path(path).read_bytes() == good
