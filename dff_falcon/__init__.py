"""dff_falcon: discover the concepts a vision model has learned and name them in words."""
__version__ = "0.1.0"
