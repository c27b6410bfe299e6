"""Infrastructure every layer may use: the one storage module (local folders, ``file://``, ``s3://``),
Ray start-up and node resources, the retraining lease, quiet output and the jobs' logger."""
