"""moeplace: affinity-aware expert placement for Mixture-of-Experts inference."""

__version__ = "0.1.0"
