"""The bundle and its trust: the typed manifest, loading and verifying a bundle, signatures, device-built
engine records, the runtime's requirements, and atomic writes."""
