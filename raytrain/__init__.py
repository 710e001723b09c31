"""raytrain: multi-RoI human mesh recovery on Ray."""
__version__ = "0.1.0"
