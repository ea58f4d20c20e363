"""The package version (a leaf module: importing it never imports the rest of the package)."""

__version__ = "0.1.0"
