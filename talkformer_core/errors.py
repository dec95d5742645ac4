"""Errors a user sees. Each names the file (or input) and says what was expected."""


class TalkFormerError(Exception):
    """Base class of every error raised on purpose by talkformer_core."""


class InputError(TalkFormerError, ValueError):
    """An input file or value is missing, unreadable, corrupt or of the wrong kind."""


class AudioError(InputError):
    pass


class VideoError(InputError):
    pass


class FaceError(InputError):
    pass


class CheckpointError(TalkFormerError, ValueError):
    """A checkpoint of the wrong format, kind, shape or config."""


class VAEMismatchError(CheckpointError):
    """The external VAE given is not the one the checkpoint was trained with (its weights' sha256
    differs from the checkpoint's record)."""


class OutputError(InputError):
    """An output path that cannot be written (read-only folder, a file where a folder is needed,
    a folder where a file is needed, a full disk)."""
