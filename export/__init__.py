"""SavedModel + serving signatures, TFLite/LiteRT conversion, parity checks.

Takes a trained model bundle (`models.bundle.ModelBundle`) and image arrays; imports
`models/`, `common/` and TensorFlow, never `app/` (reading data is the caller's job:
`app.export_lib` samples the real images that `export.all_formats.export_all` calibrates and
compares on).

Modules (importing `export` itself loads nothing heavy; each module imports TensorFlow):
- `export.graph`: the shared serving computation (normalise, model, softmax) in float32.
- `export.image_header`: `decode_image`, the one image decoder, which reads the size from
  the header (`header_size`) and refuses an image over the pixel limit before decoding.
- `export.saved_model`: the TF Serving SavedModel (`serving_default`, `serving_bytes`),
  integer versions, warm-up records (`write_warmup_requests`, `read_warmup_requests`),
  `load_serving` to run it.
- `export.tflite`: float32 / float16 / dynamic-range int8 / full-int8 `.tflite` conversion and
  `TFLiteClassifier`, the one LiteRT runner.
- `export.metadata`: the TFLite model metadata (labels, input normalisation) in every `.tflite`.
- `export.onnx`: `model.onnx` (Keras' ONNX export) and `ONNXClassifier` (ONNX Runtime).
- `export.model_card`: `model_card.md`, written from the report.
- `export.client`: the TF Serving client (REST/gRPC requests, `python -m export.client`);
  no TensorFlow needed for REST.
- `export.model_input`: image arrays as the models take them (`Sample`, `to_model_input`).
- `export.report`: size, latency and agreement of every format against Keras.
- `export.all_formats`: `export_all`, every format plus the report, into one folder.
"""

# `python -m app.export --formats=...` names, in the order they are written.
SAVED_MODEL = "saved_model"
TFLITE_FORMATS = ("float32", "float16", "dynamic_int8", "int8")
ONNX = "onnx"
FORMATS = (SAVED_MODEL, *TFLITE_FORMATS, ONNX)

# The serving contract, what clients of the SavedModel rely on: the signature names, their
# input names (`images` uint8 [batch, h, w, 3]; `image_bytes` string [batch]) and the three
# outputs every signature returns.
SIGNATURE_IMAGES = "serving_default"
SIGNATURE_BYTES = "serving_bytes"
INPUT_IMAGES = "images"
INPUT_BYTES = "image_bytes"
OUTPUTS = ("probabilities", "classes", "class_names")
