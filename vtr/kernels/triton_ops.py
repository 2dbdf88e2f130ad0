"""Fused Triton kernels (filled in by the kernels work; until then every op falls back to the reference)."""
try:
    import triton  # noqa: F401
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    AVAILABLE = False
