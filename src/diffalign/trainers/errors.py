"""How a run that failed on its own (not the user's input) ends: the CLI prints one line and exits 1."""

from __future__ import annotations


class RunFailedError(RuntimeError):
    """A run that stopped on its own failure (not the user's input): the CLI prints one line and exits 1."""


class TrainingDivergedError(RunFailedError):
    """The loss became NaN/inf; nothing from that step was applied or saved."""


class CheckpointWriteError(RunFailedError):
    """A checkpoint could not be written (e.g. the disk is full); the previous checkpoint is untouched."""
