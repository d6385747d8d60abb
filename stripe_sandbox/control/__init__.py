"""Control routes under `/sandbox/_control` for tests and demos; each module registers its own
with `stripe_sandbox.api.control`. Not part of Stripe's API."""
