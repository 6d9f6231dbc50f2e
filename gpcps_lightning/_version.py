"""The library's version, in one place (read by ``pyproject.toml`` and re-exported by the package)."""

__version__ = "0.1.0.dev0"
