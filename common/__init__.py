"""What every layer shares, with no Keras and no TensorFlow: user errors, safe file writes,
the run lock and the image pixel limit.

- `common.errors`: `UsageError` (the user's to fix: one line, exit code 2) and
  `first_line`, the one useful line of a long (TensorFlow) error message.
- `common.files`: atomic writes (`atomic_path`, `write_text_atomic`, `write_json`).
- `common.lock`: one writer per directory (`hold`, `LockedError`).
- `common.pixel_limits`: `MAX_PIXELS` and the one wording of the "too large" refusal.
"""
