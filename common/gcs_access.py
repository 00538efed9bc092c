"""Whether `gs://` can work here, found out in seconds, before TensorFlow tries.

TensorFlow's GCS file system fails at once without DNS, but a metadata server that accepts a
connection and never answers (a firewall, a half-configured node) holds its first `gs://`
call for many minutes: 61 s a try, retried with backoff. Its `GCS_*` retry and timeout
settings do not shorten that, and count only when set before `import tensorflow`. So the
programs check first, each probe bounded by `TIMEOUT` seconds, run side by side:

1. the network: the storage endpoint TensorFlow calls (`www.googleapis.com`) resolves (skipped
   behind an `HTTPS_PROXY`, which resolves names itself);
2. credentials, in TensorFlow's order: the file `GOOGLE_APPLICATION_CREDENTIALS` names, gcloud's
   application-default credentials, else the metadata server (`GCE_METADATA_HOST`, default
   `metadata.google.internal`: GKE Workload Identity, a GCE VM) answering as one
   (`Metadata-Flavor: Google`). `NO_GCE_CHECK=true` means anonymous on purpose (public buckets).

Example:

    from common import gcs_access
    gcs_access.check("gs://my-bucket/runs/r1")  # StorageError in one line, or nothing
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections.abc import Callable

from common.files import StorageError, scheme

# Seconds each probe may take.
TIMEOUT = 2.0
# The endpoint TensorFlow's gs:// file system calls (hard-coded in TF 2.21).
STORAGE_HOST = "www.googleapis.com"
DEFAULT_METADATA_HOST = "metadata.google.internal"
FIX = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run where a metadata "
    "server answers (Workload Identity on GKE, a GCE VM), or NO_GCE_CHECK=true for anonymous "
    "access to public buckets"
)


def _network_problem() -> str | None:
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return None
    try:
        socket.getaddrinfo(STORAGE_HOST, 443, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"{STORAGE_HOST} does not resolve ({e.strerror or e}): no network or no DNS"
    return None


def _credentials_file() -> str | None:
    """The credentials file TensorFlow would use, if any."""
    explicit = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        return explicit
    config = os.environ.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud")
    well_known = os.path.join(config, "application_default_credentials.json")
    return well_known if os.path.isfile(well_known) else None


def metadata_problem(host: str, timeout: float) -> str | None:
    """Why the metadata server at `host` ("name[:port]") is not one, or None when it answers
    as one within `timeout` seconds."""
    where = f"the metadata server at {host}"
    connection = http.client.HTTPConnection(host, timeout=timeout)
    try:
        connection.request("GET", "/computeMetadata/v1/", headers={"Metadata-Flavor": "Google"})
        response = connection.getresponse()
        flavor = response.getheader("Metadata-Flavor")
    except TimeoutError:
        return f"{where} did not answer within {timeout:g} s"
    except (OSError, http.client.HTTPException) as e:
        return f"{where} cannot be reached ({getattr(e, 'strerror', None) or e})"
    finally:
        connection.close()
    if flavor != "Google":
        return f"{where} answered HTTP {response.status}, not as a metadata server"
    return None


def _credentials_problem(timeout: float) -> str | None:
    path = _credentials_file()
    if path:
        if os.path.isfile(path):
            return None
        return f"GOOGLE_APPLICATION_CREDENTIALS names {path}, which is not a file"
    if os.environ.get("NO_GCE_CHECK", "").lower() == "true":
        return None  # anonymous, on purpose
    host = os.environ.get("GCE_METADATA_HOST") or DEFAULT_METADATA_HOST
    problem = metadata_problem(host, timeout)
    return problem and f"no credentials: no key file, and {problem}"


def _started(probe: Callable[[], str | None]) -> tuple[threading.Thread, list]:
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(probe()), daemon=True)
    thread.start()
    return thread, answer


def check(path: str, timeout: float = TIMEOUT) -> None:
    """Refuses a `gs://` path that cannot work here (no network, no credentials), within about
    `timeout` seconds; other paths pass.

    Raises:
        StorageError: one line naming the path, what is missing and what to do.
    """
    if scheme(path) != "gs":
        return
    # Daemon threads: getaddrinfo has no timeout, and a hung lookup must not hold the exit.
    probes = {
        f"{STORAGE_HOST} did not resolve within {timeout:g} s": _started(_network_problem),
        "no credentials: the metadata server did not answer in time": _started(
            lambda: _credentials_problem(timeout)
        ),
    }
    problems = []
    for late, (thread, answer) in probes.items():
        thread.join(2 * timeout + 1)  # connecting and reading may each take `timeout`
        problems.append(answer[0] if answer else late)
    problems = [p for p in problems if p]
    if problems:
        raise StorageError(
            f"{path}: cannot use Google Cloud Storage: {'; '.join(problems)}. Check the "
            f"network, or {FIX}; or use a local path"
        )
