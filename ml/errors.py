"""The library's exception hierarchy: one module, so callers know what they can catch."""

from __future__ import annotations


class MLError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(MLError, ValueError):
    """A configuration value is missing or invalid; the message names it and what is allowed."""


class DataError(MLError):
    """Input data cannot be used (unknown layout, unreadable labels file, empty dataset...)."""


class UnsafeArchiveError(DataError):
    """An archive entry would escape the destination, is a link/special file, or is a bomb."""


class UnsafeNameError(DataError):
    """A name that becomes part of a store key or a local path (run id, version, candidate, file) is
    not a plain, safe segment; raised where the name is read: config, command line or store listing."""


class DataQualityError(DataError):
    """The data-quality suite failed; `failures` lists the failed expectations."""

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class SourceError(DataError):
    """A dataset source (Kaggle, S3, file) cannot be reached or authenticated."""


class UnknownArchitectureError(MLError, KeyError):
    """A candidate or architecture name is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class StorageError(MLError):
    """The object store refused or failed an operation (message never carries secrets)."""


class StorageAuthError(StorageError):
    """The object store rejected the credentials: retrying cannot help, fix the connection."""


class MissingObjectError(StorageError, KeyError):
    """The key does not exist in the bucket (a StorageError that is also a KeyError)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class IncompleteVersionError(StorageError):
    """A version has no COMPLETE marker (still uploading, or its publish died half-way)."""


class CacheCorruptError(DataError):
    """A cache folder is missing files, truncated, or fails its checksums."""


class ObjectExistsError(StorageError):
    """A write to an immutable key was refused because the key already exists."""


class PromotionConflict(StorageError):
    """The production pointer changed under us: another promotion won the race."""


class ModelVerificationError(MLError):
    """A stored model failed its sha256 check or could not be loaded safely."""
