"""Examples of using the billing API from a host application (not installed with the package)."""
