"""Prefect flows and Ray actors for batch generation."""
