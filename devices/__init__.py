"""Device profiles: one TOML file per target; a tiny stdlib loader."""
from .errors import ProjectableEdgeError
from .profiles import (
    DEFAULT_TARGET,
    Budgets,
    DeviceProfile,
    TensorRTOptions,
    list_profiles,
    load_profile,
    profile_dir,
)

__all__ = [
    "DEFAULT_TARGET",
    "Budgets",
    "DeviceProfile",
    "ProjectableEdgeError",
    "TensorRTOptions",
    "list_profiles",
    "load_profile",
    "profile_dir",
]
