"""Networks and geometry of CRM: pure PyTorch, any device, no I/O, no orchestration."""
