"""What every layer shares, with no Keras: user errors, the file layer, the run lock and the
image pixel limit.

- `common.errors`: `UsageError` (the user's to fix: one line, exit code 2) and
  `first_line`, the one useful line of a long (TensorFlow) error message.
- `common.files`: the one file layer: local paths through the OS, remote ones (`gs://`,
  `ram://`, ...) through `tf.io.gfile`, imported only for them; crash-safe writes
  (`atomic_path`, `write_bytes`, `write_text`, `write_json`, `copy`).
- `common.gcs_access`: whether `gs://` can work here (network, credentials), in seconds.
- `common.lock`: one writer per directory (`hold`, `LockedError`): a `flock`ed file on a
  local disk, a lock object with a heartbeat in a bucket.
- `common.pixel_limits`: `MAX_PIXELS` and the one wording of the "too large" refusal.
"""
