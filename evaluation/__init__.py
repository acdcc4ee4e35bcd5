"""Evaluation of predicted meshes against Google Scanned Objects ground truth."""
