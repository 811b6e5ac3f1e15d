"""Storage URIs: a local path or s3://bucket/prefix, behind one pyarrow filesystem.

S3-compatible endpoints (MinIO, Ceph, R2) come from AWS_ENDPOINT_URL, which
pyarrow ignores unless passed as `endpoint_override`. Credentials always come
from the AWS default chain and are never given to the filesystem object: Ray
pickles that object into the experiment state, so explicit keys would be
written into storage.
"""

from __future__ import annotations

import copyreg
import errno
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from model.config import ConfigError

DEFAULT_STORAGE = "~/sweep-results"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Storage:
    """Where experiments live: `root` is a path inside `filesystem`."""

    uri: str
    filesystem: pafs.FileSystem
    root: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, path: str) -> str:
        """The user-facing address of a filesystem path (s3://... or a local path)."""
        return f"s3://{path}" if self.is_s3 else path


def check_name(name: str, what: str = "experiment name") -> str:
    """Names become storage paths: refuse anything that could leave the prefix."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ConfigError(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-' (no '/', no '..')"
        )
    return name


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("SWEEP_STORAGE") or DEFAULT_STORAGE


def open_storage(uri: str | None = None, patient: bool = True) -> Storage:
    """Parse a storage URI. `patient` retries S3 calls for minutes (sweeps); else it fails fast."""
    uri = resolve_uri(uri)
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if not bucket or not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
            raise ConfigError(f"--storage {uri!r} is not a valid s3://bucket/prefix URI")
        root = f"{bucket}/{prefix}" if prefix else bucket
        return Storage(f"s3://{root}", s3_filesystem(patient), root)
    if "://" in uri:
        raise ConfigError(f"--storage {uri!r}: only local paths and s3://bucket/prefix are supported")
    path = Path(uri).expanduser().resolve()
    return Storage(str(path), pafs.LocalFileSystem(), str(path))


PATIENT_ATTEMPTS = 12


def s3_options(patient: bool) -> dict:
    """How S3 is reached: the endpoint and region from the environment, and how long a call may take. Patient
    (sweeps) rides out an endpoint that is gone for a minute; impatient (the commands that read) fails within
    seconds: 2 attempts of a 2 s connect."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None)
    options = dict(connect_timeout=5 if patient else 2, request_timeout=60 if patient else 5,
                   max_attempts=PATIENT_ATTEMPTS if patient else 2)
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    if region:
        options["region"] = region
    return options


def s3_filesystem(patient: bool) -> pafs.S3FileSystem:
    options = s3_options(patient)
    attempts = options.pop("max_attempts")
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


def _patient_s3_from_pickle(options: dict) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=PATIENT_ATTEMPTS))


def _reduce_s3_filesystem(filesystem: pafs.S3FileSystem):
    _, (options,) = filesystem.__reduce__()
    return _patient_s3_from_pickle, (options,)


# pyarrow drops the retry strategy when an S3FileSystem is pickled, so the copy Ray
# sends to every trial gave up on the first refused connection: a trial restarting
# during an S3 outage burned through its retries in milliseconds. Copies made by
# pickling (all of them trial-side) are rebuilt patient. Credentials are never in
# the options: they come from each node's AWS chain.
copyreg.pickle(pafs.S3FileSystem, _reduce_s3_filesystem)


def check_writable(storage: Storage) -> None:
    """Preflight: the bucket exists and a marker can be written and removed."""
    filesystem = open_storage(storage.uri, patient=False).filesystem if storage.is_s3 else storage.filesystem
    try:
        if storage.is_s3:
            bucket = storage.root.split("/")[0]
            if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ConfigError(f"bucket {bucket!r} does not exist; create it or pick another --storage")
        else:
            filesystem.create_dir(storage.root, recursive=True)
        marker = storage.path(f".sweep-preflight-{uuid.uuid4().hex}")
        with filesystem.open_output_stream(marker) as stream:
            stream.write(b"ok")
        filesystem.delete_file(marker)
    except ConfigError:
        raise
    except (OSError, Exception) as error:  # pyarrow maps AWS errors onto OSError subclasses
        raise ConfigError(describe_storage_error(storage, error)) from None


def is_storage_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def describe_storage_error(storage: Storage, error: Exception) -> str:
    """One line saying what is wrong with the storage and how to fix it."""
    text = str(error)
    if storage.is_s3:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        if any(
            code in text
            for code in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "ACCESS_DENIED",
                "Forbidden",
                "403",
            )
        ):
            return (f"S3 refused the credentials for {storage.uri}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                    "or AWS_PROFILE")
        if "NoSuchBucket" in text or "NOT_FOUND" in text:
            return f"bucket of {storage.uri} does not exist; create it or pick another --storage"
        if any(word in text.lower() for word in ("connect", "resolve", "timed out", "timeout", "network", "curl")):
            return f"cannot reach the S3 endpoint {endpoint} for {storage.uri}: check AWS_ENDPOINT_URL and the network"
        return f"cannot write to {storage.uri}: {text.splitlines()[0][:200]}"
    if "Read-only" in text or "read-only" in text:
        return f"--storage {storage.uri} is on a read-only file system; pick a writable --storage"
    if is_storage_full(error):
        return f"--storage {storage.uri} is full; free space or pick another --storage"
    return f"--storage {storage.uri} is not writable ({text.splitlines()[0][:200]})"


def read_text(storage: Storage, path: str) -> str:
    with storage.filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(storage: Storage, path: str, text: str) -> None:
    """Write a small file whole or not at all: an S3 PUT is atomic; locally, write then rename."""
    write_bytes(storage, path, text.encode())


def write_bytes(storage: Storage, path: str, data: bytes) -> None:
    """`put_bytes`, with a failure said as one line about the storage (ConfigError)."""
    try:
        put_bytes(storage, path, data)
    except OSError as error:
        raise ConfigError(describe_storage_error(storage, error)) from None


def put_bytes(storage: Storage, path: str, data: bytes) -> None:
    """Write a file whole or not at all: an S3 upload lands complete or not at all; locally, write then rename.

    Raises OSError (ENOSPC for a full disk) when it cannot; nothing partial is left behind.
    """
    if storage.is_s3:
        with storage.filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    partial = f"{path}.partial-{uuid.uuid4().hex}"
    try:
        storage.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with storage.filesystem.open_output_stream(partial) as stream:
            stream.write(data)
        storage.filesystem.move(partial, path)
    except OSError:
        try:
            storage.filesystem.delete_file(partial)
        except OSError:
            pass
        raise


def exists(storage: Storage, path: str) -> bool:
    return storage.filesystem.get_file_info(path).type != pafs.FileType.NotFound
