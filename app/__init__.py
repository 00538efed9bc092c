"""The application: command-line programs (absl) over the libraries they call.

A program `app/<verb>.py` (the command-line contract: flags, one library call) has its library
`app/<verb>_lib.py`: evaluate, predict, export and visualize; `app.train`'s library is the
package `app/training/`. Shared libraries: `app/data/` (the input pipeline), `app/inference.py`
(a `Predictor` per model format), `app/metrics.py`, `app/plots.py`. The top-level package
`export/` (SavedModel, TFLite, ONNX) is what `app/export_lib.py` calls.
"""
