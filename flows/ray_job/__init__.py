"""The Ray job of a batch run: the driver (``driver``), the workers it runs (``workers``), and the
backends they call (``backends``: the CRM pipeline; ``fake_backends``: no-op and fault injection)."""
