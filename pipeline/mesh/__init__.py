"""Mesh data types (``types``) and the cleaning the official pipeline applies (``cleaning``)."""
