"""wmctl pipeline: the `wmctl` CLI, stage runner, LeRobot ingest, frame reading and built-in datasets."""

__version__ = "0.1.0"
