"""One module per Stripe resource; each registers its endpoints with `api.endpoint`."""
