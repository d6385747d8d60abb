"""The `billing` command line (`cli.main:main`), above the GraphQL layer it serves."""
