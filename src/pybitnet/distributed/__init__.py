"""pybitnet on a Ray cluster: corpus scoring on Ray Data (an actor pool, the model loaded once per actor),
and the OpenAI-compatible server as Ray Serve replicas (`pybitnet.distributed.serving`).

Ray is an optional extra (`pip install "pybitnet[ray]"`); it is imported only when a function here runs,
so `import pybitnet.distributed` works without it and a call says how to install it.
"""

from .scoring import RayUnavailableError, require_ray, score_corpus

__all__ = ["score_corpus", "require_ray", "RayUnavailableError"]
