"""Training a small Nemotron-H on the Python standard library: the data (``data``)."""
from . import data  # noqa: F401
