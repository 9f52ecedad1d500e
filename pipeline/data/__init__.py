"""Reading handed-in image sets (``ingest``) and serving them to Lightning (``datamodule``).

Submodules are imported explicitly so that ingest does not pay for importing torch and Lightning.
"""
