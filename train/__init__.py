"""cycdata.train: the optimizer side of the cycle and the ``cycdata`` command line."""
