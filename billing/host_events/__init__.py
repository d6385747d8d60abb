"""Events for the host app's backend, in the Standard Webhooks format.

`events`: what happened (built from a sync's before/after and the Stripe events it applied),
written to the `host_event` outbox in the same transaction as the change. `delivery`: the
worker that signs and POSTs them, retrying on a schedule. `admin`: list and replay.
"""
