#!/bin/sh
# Writes a TF Serving REST predict body for the `serving_bytes` signature to stdout, one
# instance per image file, for `curl --data-binary @body.json`. The images go through a pipe,
# never the command line (no "Argument list too long"), and `base64 < file | tr -d '\n'`
# works with GNU, BSD and macOS base64 alike.
#
#   sh deploy/rest_body.sh cat.jpg dog.png > body.json
#   curl -s -X POST -H 'Content-Type: application/json' --data-binary @body.json \
#       http://localhost:8501/v1/models/resnet:predict
set -eu
if [ "$#" -eq 0 ]; then
  echo "usage: sh deploy/rest_body.sh IMAGE [IMAGE ...] > body.json" >&2
  exit 2
fi
for image in "$@"; do
  if [ ! -r "$image" ]; then
    echo "error: cannot read $image" >&2
    exit 2
  fi
done
printf '{"signature_name": "serving_bytes", "instances": ['
separator=''
for image in "$@"; do
  printf '%s{"image_bytes": {"b64": "' "$separator"
  base64 < "$image" | tr -d '\n'
  printf '"}}'
  separator=', '
done
printf ']}\n'
