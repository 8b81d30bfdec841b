"""Helpers shared by every test suite, one module per concern (fixtures stay in conftest.py).

- `live`: the processes tests run against: the mock upstream, gateways, settings probes.
- `listeners`: local listeners that count or redirect what reaches them.
- `workers`: polling, and Celery worker processes of a test's own.
- `http`: driving `/v1` (SDK clients, raw posts, SSE) and checking error shapes.
- `money`: cost maths, USD strings, the ledger and the Redis budget counters.
- `dashboard`: signing in to the dashboard over real HTTP.
"""
