"""Typed errors. Everything echo-agent raises on bad *user* input derives from `EchoError`,
so the CLI and server can turn it into a clear message instead of a traceback.

Model-made input (a malformed `<seg>` tag, a hostile tool call) never raises: the runtime turns
it into a note for the model and an invalid `ListenCall` record.
"""

from __future__ import annotations


class EchoError(Exception):
    """Base class for errors caused by input the user controls (files, arguments, config)."""


class AudioError(EchoError):
    """The audio could not be used."""


class AudioNotFoundError(AudioError):
    """The file does not exist or is not a regular file."""


class AudioDecodeError(AudioError):
    """The bytes are not decodable audio (corrupt, truncated, or an unsupported format)."""


class EmptyAudioError(AudioError):
    """The audio decodes to zero samples."""


class NonFiniteAudioError(AudioError):
    """The decoded samples contain NaN or Inf."""


class AudioTooLargeError(AudioError):
    """The file is larger than the configured byte limit."""


class AudioTooLongError(AudioError):
    """The audio is longer than the configured duration limit."""


class AudioChangedError(AudioError):
    """A file referenced by saved state no longer has the content hash it had when it was loaded."""


class ConfigError(EchoError):
    """Invalid configuration or command-line arguments."""


class BackendError(EchoError):
    """A model backend failed in a way the caller should see (bad model path, server unreachable)."""


class DataError(EchoError):
    """A benchmark, results or trajectories file is missing or malformed."""


class OutputError(EchoError):
    """An output file could not be written (a full disk, a quota, a read-only file system). What was written
    before stays whole, so a rerun resumes."""
