"""Model families: one module or subpackage per family, each registered by model type."""
