"""Ray Train, bottom to top: the settings (config), a run in storage (runs), the uint8 pixel cache
(pixel_cache), the worker loop (loop), publishing a model version (publish), the driver (train), and
leave-one-source-out (loso)."""
