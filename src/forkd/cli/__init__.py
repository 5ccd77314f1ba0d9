"""The ``forkd`` command line."""
