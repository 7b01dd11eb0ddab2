"""Adapters that make other agent frameworks durable with torpor.

Each adapter lives in its own module and imports its framework there only, so
``import torpor`` never needs an optional package:

- :mod:`torpor.integrations.openai_agents`: the OpenAI Agents SDK (``agents``).
- :mod:`torpor.integrations.langgraph`: LangGraph.

Invariant for every adapter: it uses only the public log API of
:class:`torpor.session.Session` (``append``, ``checkpoint``, ``entries``,
``sandbox``, ``fork``, ``recover``), so it gets the same guarantees as
torpor's own loop.  Guide: ``docs/integrations.md``.
"""
