"""The error every checkpoint problem is reported as."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message lists every problem."""
