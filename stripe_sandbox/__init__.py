"""A local, stateful emulator of the part of Stripe's HTTP API this project uses.

For development and tests only. It behaves as Stripe documents, not as the service expects, and
shares no code with the domain modules (an emulator built from the code it checks could not
catch that code's bugs): it imports nothing of the project (`db`, `billing`, `graph`, `cli`).
Only the app factory (`graph/app.py`) mounts it, under `/sandbox`, and imports it only in sandbox
mode; the official `stripe` SDK reaches it at `/sandbox/v1/...` exactly as it reaches Stripe.
"""
