"""The transport: Strawberry schema, permission classes, the FastAPI app and the CLI."""
