"""pcocc: Private Cloud On a Compute Cluster."""

__version__ = "0.1.0"
