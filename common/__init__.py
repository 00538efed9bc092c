"""What every layer shares, with no Keras and no TensorFlow: user errors and safe file writes.

- `common.errors`: `UsageError` (the user's to fix: one line, exit code 2) and
  `first_line`, the one useful line of a long (TensorFlow) error message.
- `common.files`: atomic writes (`atomic_path`, `write_text_atomic`, `write_json`).
"""
