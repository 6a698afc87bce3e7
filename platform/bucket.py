"""An S3 bucket as a pyarrow filesystem, through boto3: what Ray Tune keeps a sweep's state and checkpoints in,
and what the sweep reads and writes its own files with, when its workspace is ``s3://BUCKET/PREFIX``.

pyarrow's own S3 filesystem (the AWS C++ SDK) streams each upload as a multipart upload with aws-chunked
bodies and trailing checksums since the SDK's 2025 defaults, which S3-compatible stores do not all accept
(moto's server never completes one: measured 2026-12-04 with pyarrow 21 and 25, moto 5.2). boto3 sends a
small file in one PUT, reads the same endpoint and credential settings as MLflow's S3 artifact store, and
honours ``AWS_REQUEST_CHECKSUM_CALCULATION``. Objects are read whole and written whole (one request each):
a sweep's files are small, its checkpoints are megabytes.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import pyarrow as pa
from pyarrow import fs

_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def configured_endpoint() -> str | None:
    """The S3 endpoint the environment names (MinIO, a test server), or None for AWS itself."""
    return next((os.environ[name] for name in _ENDPOINT_VARIABLES if os.environ.get(name)), None)


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.strip("/").partition("/")
    return bucket, key


def _missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


class _Upload(io.BytesIO):
    """Bytes written here are stored as one object when the stream closes."""

    def __init__(self, store: BucketHandler, path: str) -> None:
        super().__init__()
        self.store, self.path = store, path

    def close(self) -> None:
        if not self.closed:
            self.store.write(self.path, self.getvalue())
        super().close()


class BucketHandler(fs.FileSystemHandler):
    """``pyarrow.fs.PyFileSystem(BucketHandler(endpoint))``. Directories are key prefixes. Pickled (Tune
    sends it to every trial) with its endpoint only: each process makes its own client from its own
    credentials."""

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.endpoint, self._client = state["endpoint"], None

    @property
    def client(self):
        if self._client is None:
            import boto3

            # Where the credentials came from is said at INFO, on every node's console: not news.
            logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
            self._client = boto3.client("s3", endpoint_url=self.endpoint)
        return self._client

    def get_type_name(self) -> str:
        return "dreamfusion-bucket"

    def equals(self, other) -> bool:
        return isinstance(other, BucketHandler) and other.endpoint == self.endpoint

    def normalize_path(self, path: str) -> str:
        return path.strip("/")

    def _objects(self, bucket: str, prefix: str, delimiter: str | None = None):
        arguments = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        for page in self.client.get_paginator("list_objects_v2").paginate(**arguments):
            yield from ((item, False) for item in page.get("Contents", []))
            yield from ((item, True) for item in page.get("CommonPrefixes", []))

    def get_file_info(self, paths: list[str]) -> list[fs.FileInfo]:
        infos = []
        for path in paths:
            bucket, key = _split(path)
            if not key:
                infos.append(fs.FileInfo(path, fs.FileType.Directory))
                continue
            try:
                head = self.client.head_object(Bucket=bucket, Key=key)
                infos.append(fs.FileInfo(path, fs.FileType.File, size=head["ContentLength"],
                                         mtime=head["LastModified"]))
                continue
            except Exception as exc:
                if not _missing(exc):
                    raise OSError(f"s3://{path}: {exc}") from exc
            found = next(self._objects(bucket, key.rstrip("/") + "/"), None)
            infos.append(fs.FileInfo(path, fs.FileType.Directory if found else fs.FileType.NotFound))
        return infos

    def get_file_info_selector(self, selector: fs.FileSelector) -> list[fs.FileInfo]:
        bucket, key = _split(selector.base_dir)
        prefix = f"{key.rstrip('/')}/" if key else ""
        infos: dict[str, fs.FileInfo] = {}
        for item, is_prefix in self._objects(bucket, prefix, None if selector.recursive else "/"):
            name = item["Prefix"] if is_prefix else item["Key"]
            relative = name[len(prefix):].strip("/")
            if not relative:
                continue
            parts = relative.split("/")
            # A recursive listing names each folder on the way to a file, as a filesystem's would.
            for depth in range(1, len(parts) if not is_prefix else len(parts) + 1):
                folder = f"{bucket}/{prefix}{'/'.join(parts[:depth])}"
                infos.setdefault(folder, fs.FileInfo(folder, fs.FileType.Directory))
            if not is_prefix:
                path = f"{bucket}/{name}"
                infos[path] = fs.FileInfo(path, fs.FileType.File, size=item["Size"], mtime=item["LastModified"])
        if not infos and not selector.allow_not_found and key:
            if self.get_file_info([selector.base_dir])[0].type == fs.FileType.NotFound:
                raise FileNotFoundError(f"s3://{selector.base_dir}")
        return list(infos.values())

    def create_dir(self, path: str, recursive: bool) -> None:
        """Prefixes need no creating."""

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        bucket, key = _split(path)
        keys = [item["Key"] for item, is_prefix in self._objects(bucket, f"{key.rstrip('/')}/") if not is_prefix]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch})

    def delete_dir(self, path: str) -> None:
        self.delete_dir_contents(path)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty a whole bucket")

    def delete_file(self, path: str) -> None:
        bucket, key = _split(path)
        self.client.delete_object(Bucket=bucket, Key=key)

    def copy_file(self, source: str, destination: str) -> None:
        source_bucket, source_key = _split(source)
        bucket, key = _split(destination)
        self.client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key})

    def move(self, source: str, destination: str) -> None:
        self.copy_file(source, destination)
        self.delete_file(source)

    def read(self, path: str) -> bytes:
        bucket, key = _split(path)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _missing(exc):
                raise FileNotFoundError(f"s3://{path}") from None
            raise OSError(f"s3://{path}: {exc}") from exc

    def write(self, path: str, data: bytes) -> None:
        """``data`` as the object at ``path`` (``bucket/key``), in one request."""
        bucket, key = _split(path)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def open_input_stream(self, path: str):
        return pa.BufferReader(self.read(path))

    def open_input_file(self, path: str):
        return pa.BufferReader(self.read(path))

    def open_output_stream(self, path: str, metadata=None):
        return pa.PythonFile(_Upload(self, path), mode="w")

    def open_append_stream(self, path: str, metadata=None):
        raise OSError("objects cannot be appended to")


def bucket_filesystem() -> fs.PyFileSystem:
    return fs.PyFileSystem(BucketHandler(configured_endpoint()))
