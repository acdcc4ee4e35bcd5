"""Inputs: decoding an image safely (``decode``), preprocessing it the official way (``preprocess``),
and object ids (``ids``)."""
