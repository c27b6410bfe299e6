"""Duplicate radiographs, across sources: fingerprints, the nearest-neighbour candidate index, and
verification of candidate pairs."""
