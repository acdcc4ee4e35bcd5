"""Batch I/O on any fsspec storage: input and results manifests (``manifest``, pyarrow) and object
storage (``storage``: reads, atomic writes, listing)."""
