"""A sweep's workspace (``--workspace``): a local folder, or ``s3://BUCKET/PREFIX`` for clusters whose nodes
share a bucket rather than a filesystem. Layout::

    mlflow/        mlflow.db (sqlite store), artifacts/, server.log   (a local workspace without --tracking-uri)
    ray/NAME/      Ray Tune's experiment state and trial checkpoints (storage_path)
    sweeps/NAME/   sweep.json (parent run, experiment, dashboard view), spec.yaml, results.parquet
    cache/         text embeddings (guidance and CLIP), computed once by the driver, read by every trial

In object storage, Tune keeps its state and checkpoints through a pyarrow filesystem over boto3, the sweep's own
files are objects, and the text embeddings are mirrored: the driver stores each one it computes, a trial
fetches the ones it needs into its node's cache. The MLflow store cannot live there (a sqlite file needs a
filesystem), so such a workspace needs ``--tracking-uri``. The endpoint comes from ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` (MinIO, a test server), credentials from the AWS chain
of each node; no secret is ever written into the workspace (``dreamfusion_platform.bucket``).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from pyarrow import fs

from dreamfusion.errors import UserInputError
from dreamfusion_platform.bucket import BucketHandler, configured_endpoint

STATE = "sweep.json"
RESULTS = "results.parquet"
SPEC = "spec.yaml"
S3 = "s3://"


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(S3)


def _s3_path(location: str) -> str:
    path = location[len(S3):].strip("/")
    if not path or path.startswith("/"):
        raise UserInputError(f"--workspace {location} names no bucket; use s3://BUCKET/PREFIX")
    return path


def _storage_error(location: str, exc: Exception) -> UserInputError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code == "NoSuchBucket":
        fix = "create the bucket, or name one that exists"
    elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or \
            type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        fix = ("give this machine credentials that may write there (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
               "a profile or a role)")
    else:
        fix = "check the bucket, the endpoint (AWS_ENDPOINT_URL) and the credentials"
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserInputError(f"cannot write to --workspace {location} ({first_line[:200]}); {fix}")


class CacheMirror:
    """The text-embedding cache's entries in a bucket workspace (``dreamfusion.text_cache.CacheMirror``)."""

    def __init__(self, base: str, bucket: BucketHandler) -> None:
        self.base = base  # bucket/prefix/cache
        self.bucket = bucket

    def fetch(self, relative: str, destination: Path) -> bool:
        try:
            data = self.bucket.read(f"{self.base}/{relative}")
        except OSError:
            return False
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=destination.parent, suffix=".partial", delete=False) as handle:
            handle.write(data)
        os.replace(handle.name, destination)
        return True

    def store(self, relative: str, source: Path) -> None:
        self.bucket.write(f"{self.base}/{relative}", source.read_bytes())


class Workspace:
    """Where one sweep keeps its state. ``location``: a folder, or ``s3://BUCKET/PREFIX``."""

    def __init__(self, location: str | Path, sweep: str) -> None:
        self.remote = is_remote(location)
        self.name = sweep
        if self.remote:
            self.location = str(location).rstrip("/")
            self.base = _s3_path(self.location)
            self.bucket = BucketHandler(configured_endpoint())
            self.filesystem = fs.PyFileSystem(self.bucket)
            self.root = None
            # Trials keep a node-local copy of the embeddings they read; the driver's copy is its own.
            self.cache = Path(tempfile.gettempdir()) / "dreamfusion-workspace-cache" / self.base.replace("/", "_")
        else:
            self.root = Path(location).resolve()
            self.location = str(self.root)
            self.base = str(self.root)
            self.filesystem = None
            self.cache = self.root / "cache"
        self.mlflow = None if self.remote else self.root / "mlflow"

    # Paths inside the workspace, as the user sees them.
    def where(self, *parts: str) -> str:
        return "/".join([self.location, *parts])

    @property
    def sweep_folder(self) -> str:
        return f"sweeps/{self.name}"

    @property
    def results_where(self) -> str:
        return self.where(self.sweep_folder, RESULTS)

    def cache_mirror(self) -> CacheMirror | None:
        return CacheMirror(f"{self.base}/cache", self.bucket) if self.remote else None

    def tune_storage(self) -> tuple[str, Any]:
        """``(storage_path, storage_filesystem)`` for Ray Tune."""
        return (f"{self.base}/ray", self.filesystem) if self.remote else (str(self.root / "ray"), None)

    def check_writable(self) -> None:
        """A probe written and removed; a missing bucket, no credentials or a read-only folder is one line."""
        if self.remote:
            probe = f"{self.base}/.probe-{uuid.uuid4().hex}"
            try:
                self.bucket.write(probe, b"probe")
                self.bucket.delete_file(probe)
            except Exception as exc:  # botocore's errors: a refused request, no credentials, no endpoint
                raise _storage_error(self.location, exc) from None
            return
        created = [p for p in [self.root, *self.root.parents] if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise UserInputError(f"cannot write to --workspace {self.root} ({exc.strerror}); "
                                 "choose a writable directory") from None
        finally:
            for path in created:
                if path.exists() and not any(path.iterdir()):
                    path.rmdir()

    def read_bytes(self, relative: str) -> bytes | None:
        """A file of the workspace, or None where there is none."""
        if self.remote:
            try:
                return self.bucket.read(f"{self.base}/{relative}")
            except FileNotFoundError:
                return None
        path = self.root / relative
        return path.read_bytes() if path.is_file() else None

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Whole or not at all: an object is stored in one request; a local file is renamed into place."""
        if self.remote:
            self.bucket.write(f"{self.base}/{relative}", data)
            return
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def state(self) -> dict[str, Any] | None:
        data = self.read_bytes(f"{self.sweep_folder}/{STATE}")
        return None if data is None else json.loads(data)

    def sweep_states(self) -> list[dict[str, Any]]:
        """The state of every sweep in the workspace, by name."""
        if self.remote:
            infos = self.filesystem.get_file_info(fs.FileSelector(f"{self.base}/sweeps", recursive=True,
                                                                  allow_not_found=True))
            names = sorted(info.path.rsplit("/", 2)[-2] for info in infos if info.path.endswith(f"/{STATE}"))
        else:
            names = sorted(path.parent.name for path in (self.root / "sweeps").glob(f"*/{STATE}"))
        return [json.loads(self.read_bytes(f"sweeps/{name}/{STATE}")) for name in names]
