"""The tool's version: the ground floor every layer may import (it imports nothing)."""

__version__ = "0.1.0"
