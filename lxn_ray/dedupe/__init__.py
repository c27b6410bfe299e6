"""Duplicate radiographs, across sources, bottom to top: the tunables (:mod:`.config`), one image's
fingerprint (:mod:`.fingerprint`), the nearest-neighbour candidate index (:mod:`.index`), verification of
candidate pairs (:mod:`.verify`), and the search that joins them (:mod:`.search`)."""
