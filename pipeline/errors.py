"""The one base class of errors a user can act on: the CLI prints these plainly, without a traceback."""


class PipelineError(Exception):
    """Bad input or missing prerequisite; the message names the file, key or value and what would be valid."""
