"""Ray Train: the settings, the uint8 pixel cache, the worker loop, the driver that runs and publishes
a model version, and leave-one-source-out."""
