"""Reads of the data plane's configuration tables for the edges (admin API, dashboard)."""

from __future__ import annotations

from gateway.models import ModelAlias, ModelDeployment


def model_names() -> list[str]:
    """Every public name a client may send: deployment names and aliases, sorted."""
    names = set(ModelDeployment.objects.values_list("name", flat=True))
    names |= set(ModelAlias.objects.values_list("alias", flat=True))
    return sorted(names)
