"""Tables, engine, sessions and queries. Knows nothing of Stripe or GraphQL."""
