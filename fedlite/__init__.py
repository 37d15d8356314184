"""fedlite: federated multimodal leukemia diagnosis, from GPU training to CPU hospital servers."""

import pkgutil

__version__ = "0.1.0"

# Flower runs a deployed app from its app bundle, which carries fedlite/ alone and comes first on
# sys.path; the installed copy's other subpackages (fedlite.agents, fedlite.export) stay importable.
__path__ = pkgutil.extend_path(__path__, __name__)
