"""One image -> one textured mesh: preprocessing, stages, texturing, export, manifests, storage."""
