"""Scheduled retraining: ingest, train or tune, compare with the champion, promote."""
