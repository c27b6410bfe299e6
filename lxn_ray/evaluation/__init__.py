"""Metrics with intervals, plots, scoring a model version on images (``predict``), evaluation of a
model on any source, and the champion/challenger decision."""
