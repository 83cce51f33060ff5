"""The errors a user can cause and fix; each message names the file, id or value at fault."""


class CrossmodalError(Exception):
    """Base class: scripts turn these into one clear line on stderr and exit code 2."""


class DataError(CrossmodalError, ValueError):
    """Bad input data (annotations, images, captions, split names)."""


class FeatureError(CrossmodalError, ValueError):
    """Feature or embedding files that are missing, inconsistent or of the wrong kind."""


class ModelError(CrossmodalError, RuntimeError):
    """A model (weights, tokenizer, fastText .bin, checkpoint) cannot be had or does not fit."""
