"""lxn_ray: keeps a COVID-19 chest X-ray classifier (LxN) current as the ieee8023 dataset grows, on Ray.

A research tool, not a diagnostic device. Data flows one way:
source -> dataset version -> model version -> champion -> endpoint.
"""

__version__ = "0.1.0"
