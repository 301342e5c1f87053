"""Native compute kernels, chosen explicitly at the edge by the engine."""
