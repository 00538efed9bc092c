"""SavedModel + serving signatures, TFLite/LiteRT conversion, parity checks.

Modules (importing `export` itself loads nothing heavy; each module imports TensorFlow):
- `export.graph`: the shared serving computation (resize, normalise, model, softmax).
- `export.saved_model`: the TF Serving SavedModel (`serving_default`, `serving_bytes`),
  integer versions, `load_serving` to run it.
- `export.tflite`: float32 / float16 / dynamic-range int8 / full-int8 `.tflite` conversion and
  `TFLiteClassifier` to run one.
- `export.client`: TF Serving requests (gRPC `PredictRequest`, REST JSON) and warmup records.
- `export.images`: real images (through `app.data`) for int8 calibration and agreement.
- `export.report`: size, latency and agreement of every format against Keras.
- `export.exporter`: `export_all`, what `python -m app.export` runs.
"""

# `python -m app.export --formats=...` names, in the order they are written.
SAVED_MODEL = "saved_model"
TFLITE_FORMATS = ("float32", "float16", "dynamic_int8", "int8")
FORMATS = (SAVED_MODEL, *TFLITE_FORMATS)

# The serving contract (DESIGN.md): signature, input and output names.
SIGNATURE_IMAGES = "serving_default"
SIGNATURE_BYTES = "serving_bytes"
INPUT_IMAGES = "images"
INPUT_BYTES = "image_bytes"
OUTPUTS = ("probabilities", "classes", "class_names")
