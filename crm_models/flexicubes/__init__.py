"""FlexiCubes isosurface extraction (pure PyTorch, any device), as CRM runs it at inference."""

from .extract import FlexiCubesResult, flexicubes_extract
from .grid import construct_grid
from .tables import get_tables

__all__ = ["FlexiCubesResult", "construct_grid", "flexicubes_extract", "get_tables"]
