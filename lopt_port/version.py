"""The version of lopt-port: the package's, and the one the converters record in every file
they write. The single source: ``pyproject.toml`` reads it from here."""

__version__ = "0.1.0"
