"""Texturing: UV unwrap (``unwrap``, xatlas with a face budget) and texture baking from the colour
field (``bake``, through a rasterizer of ``pipeline.raster``)."""
