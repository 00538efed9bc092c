"""The application: command-line programs (absl) over the data, training, evaluation,
prediction and export libraries. Programs: `app/{train,evaluate,predict,export,visualize}.py`;
libraries: `app/data/`, `app/training/`, `app/evaluation.py`, `app/prediction.py`,
`app/exporting.py`, `app/visualization.py`, `app/plots.py`.
"""
