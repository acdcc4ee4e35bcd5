"""What one object leaves on disk: GLB / OBJ export (``export``), ``preview.png`` (``preview``),
``views.png`` (``views_image``), ``meta.json`` (``meta``), written atomically (``atomic``)."""
