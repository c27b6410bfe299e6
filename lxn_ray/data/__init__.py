"""Immutable dataset versions with patient-level splits, and the ingest pipeline that makes them."""
