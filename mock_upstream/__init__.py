"""A mock OpenAI/Anthropic upstream for the demo, the tests and the benchmark.

Run it with ``python -m mock_upstream --port 9100``; see ``app`` for the endpoints,
the token counting rule and the fault controls. Importing this package stays cheap (no
Django, no litellm) because the server starts standalone.
"""

from __future__ import annotations
