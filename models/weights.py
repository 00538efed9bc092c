"""Pretrained-weight loading for the ResNet builders.

Sources, matched to the model by layer name:
- "imagenet": the Keras Applications ResNet-50/101/152 ImageNet weights
  (downloaded and cached by `keras.utils.get_file`, as `keras.applications` does).
- a legacy Keras `.h5` file in the same layout (what Keras Applications ships,
  or `keras.applications.ResNet50(...).save("x.h5")`): their convolutions
  carry biases, which fold exactly into the following batch norm,
  BN(conv(x) + b) == BN'(conv(x)) with moving_mean' = moving_mean - b.
- a `.keras` model file (e.g. an earlier `best.keras`).
- a Keras 3 `.weights.h5` file of the same architecture (matched by structure,
  since Keras 3 names its groups by class, not by layer).

The head (the layer the caller names, `models.resnet.HEAD`) is loaded only when it
exists in both and its shape fits; otherwise it stays freshly initialised, which is how
fine-tuning starts. Every other layer must fit exactly, or `WeightsError` names the file and
the first layer that does not. Nothing here knows the network's layer names: the caller
names the head, and a convolution's bias folds into the batch norm that takes its output in
the model's graph.
"""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np

from common import files
from common.errors import UsageError, first_line
from models.bundle import check_keras_archive

_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
# (with top, without top) md5 hashes, as in keras/src/applications/resnet.py.
_IMAGENET_HASHES = {
    "resnet50": ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
}
IMAGENET_CLASSES = 1000


class WeightsError(ValueError):
    """A weights source that cannot be loaded into the model."""


def imagenet_weights_path(arch: str, include_top: bool) -> str:
    """Downloads (once, into ~/.keras/models) the Keras Applications weights."""
    if arch not in _IMAGENET_HASHES:
        raise WeightsError(
            f"no ImageNet weights for {arch!r}: Keras Applications has them for "
            f"{', '.join(_IMAGENET_HASHES)}; use weights=None or a weights file"
        )
    suffix = "" if include_top else "_notop"
    fname = f"{arch}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    return keras.utils.get_file(
        fname,
        _BASE_URL + fname,
        cache_subdir="models",
        file_hash=_IMAGENET_HASHES[arch][0 if include_top else 1],
    )


def is_legacy_h5(path: str) -> bool:
    """Whether `path` is a legacy Keras `.h5` weights file (Keras Applications' layout)."""
    if path.endswith(".weights.h5"):
        return False
    try:
        with files.local_copy(path) as local, h5py.File(local, "r") as f:  # h5py: a local file
            return "layer_names" in f.attrs or "model_weights" in f
    except OSError:
        return False


def _read_legacy_h5(local: str, path: str) -> dict[str, list[np.ndarray]]:
    with h5py.File(local, "r") as f:
        group = f.get("model_weights", f)
        if "layer_names" not in group.attrs:
            raise WeightsError(f"{path}: not a Keras weights file (no 'layer_names')")
        out = {}
        for raw_name in group.attrs["layer_names"]:
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            layer = group[name]
            weight_names = [
                w.decode() if isinstance(w, bytes) else str(w)
                for w in layer.attrs.get("weight_names", [])
            ]
            if weight_names:
                out[name] = [np.asarray(layer[w]) for w in weight_names]
        return out


def _read_keras_file(path: str) -> dict[str, list[np.ndarray]]:
    source = keras.saving.load_model(path, compile=False)
    return {layer.name: layer.get_weights() for layer in source.layers if layer.weights}


def read_layer_weights(path: str) -> dict[str, list[np.ndarray]]:
    """Reads `{layer name: [arrays]}` from a legacy `.h5` or a `.keras` file."""
    if not files.exists(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        with files.local_copy(path) as local:  # h5py and zip need a local file
            if path.endswith(".keras"):
                check_keras_archive(local, path)  # empty, truncated, another program's zip
                return _read_keras_file(local)
            return _read_legacy_h5(local, path)
    except WeightsError:
        raise
    except UsageError as e:
        raise WeightsError(str(e)) from e
    except Exception as e:  # h5py/zip/Keras raise many types for a corrupt file
        raise WeightsError(
            f"{path}: cannot read weights ({type(e).__name__}: {first_line(e)}); "
            "expected a Keras .h5 weights file or a .keras model"
        ) from e


def _fit(path: str, layer: keras.Layer, arrays: list[np.ndarray]) -> None:
    expected = [tuple(w.shape) for w in layer.weights]
    got = [tuple(a.shape) for a in arrays]
    if expected != got:
        raise WeightsError(
            f"{path} does not fit the model: layer {layer.name!r} expects weights of "
            f"shapes {expected}, the file has {got}"
        )
    layer.set_weights(arrays)


def _batch_norm_after(model: keras.Model) -> dict[str, str]:
    """{convolution name: name of the batch norm that takes its output}, from the graph."""
    convs = {
        id(layer.output): layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    }
    return {
        convs[id(layer.input)]: layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer.input) in convs
    }


def assign_layer_weights(
    model: keras.Model, source: dict[str, list[np.ndarray]], path: str, head: str
) -> list[str]:
    """Sets every layer of `model` from `source`, folding conv biases into batch norm.

    Args:
        model: the model to fill.
        source: `{layer name: [arrays]}` (`read_layer_weights`).
        path: where `source` came from, for messages.
        head: the layer left fresh when `source` has no weights of its shape.

    Returns:
        Names of the layers left freshly initialised (only the head can be).
    """
    batch_norm_after = _batch_norm_after(model)
    pending_bias: dict[str, np.ndarray] = {}
    used, skipped = set(), []
    for layer in model.layers:
        if not layer.weights:
            continue
        arrays = source.get(layer.name)
        if layer.name == head:
            if arrays is not None and [tuple(a.shape) for a in arrays] == [
                tuple(w.shape) for w in layer.weights
            ]:
                layer.set_weights(arrays)
                used.add(layer.name)
            else:
                skipped.append(layer.name)
            continue
        if arrays is None:
            raise WeightsError(
                f"{path} does not fit the model: it has no weights for layer {layer.name!r}"
            )
        used.add(layer.name)
        arrays = [np.asarray(a) for a in arrays]
        if isinstance(layer, keras.layers.Conv2D) and not layer.use_bias and len(arrays) == 2:
            kernel, bias = arrays
            if layer.name not in batch_norm_after:
                raise WeightsError(
                    f"{path}: cannot fold the bias of {layer.name!r}: no batch norm takes its "
                    "output in the model"
                )
            pending_bias[batch_norm_after[layer.name]] = bias
            arrays = [kernel]
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.name in pending_bias:
            gamma, beta, mean, var = arrays
            arrays = [gamma, beta, mean - pending_bias.pop(layer.name), var]
        _fit(path, layer, arrays)
    extra = [name for name in source if name not in used and name != head]
    if extra:
        raise WeightsError(
            f"{path} does not fit the model: it has weights for layer {extra[0]!r}, "
            "which the model lacks (a deeper network?)"
        )
    return skipped


def load_into(model: keras.Model, weights: str, arch: str, head: str) -> list[str]:
    """Loads `weights` ("imagenet" or a path) into `model`; see the module docstring.

    Args:
        model: the network to fill.
        weights: "imagenet" or a weights file.
        arch: the Keras Applications name of the network ("resnet50"), for "imagenet".
        head: the classifier layer, kept fresh when the weights' head does not fit.

    Returns:
        Names of the layers left freshly initialised.
    """
    if weights == "imagenet":
        has_top = any(layer.name == head for layer in model.layers)
        top = has_top and model.get_layer(head).units == IMAGENET_CLASSES
        path = imagenet_weights_path(arch, include_top=top)
    else:
        path = os.fspath(weights)
    if path.endswith(".weights.h5"):
        if not files.exists(path):
            raise WeightsError(f"weights file not found: {path}")
        try:
            with files.local_copy(path) as local:
                model.load_weights(local)
        except Exception as e:
            raise WeightsError(
                f"{path} does not fit the model ({type(e).__name__}: {first_line(e)}); a "
                "Keras 3 .weights.h5 file must come from the same architecture"
            ) from e
        return []
    return assign_layer_weights(model, read_layer_weights(path), path, head)
