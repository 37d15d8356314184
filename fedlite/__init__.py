"""fedlite: federated multimodal leukemia diagnosis, from GPU training to CPU hospital servers."""

__version__ = "0.1.0"
