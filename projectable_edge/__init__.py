"""projectable-edge: one large task-conditioned Transformer -> small task-specialised models on devices."""
from projectable_edge_runtime.devices.errors import ProjectableEdgeError

__all__ = ["ProjectableEdgeError"]
__version__ = "0.1.0"
