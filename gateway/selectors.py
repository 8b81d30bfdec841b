"""Reads of the data plane's configuration tables for the edges (admin API, dashboard)."""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import QuerySet

from gateway.models import ModelAlias, ModelDeployment, ModelGroup


def model_names() -> list[str]:
    """Every public name a client may send: deployment names and aliases, sorted."""
    names = set(ModelDeployment.objects.values_list("name", flat=True))
    names |= set(ModelAlias.objects.values_list("alias", flat=True))
    return sorted(names)


def deployment_names() -> list[str]:
    """The public names that have a deployment (what an alias may point at), sorted."""
    return sorted(set(ModelDeployment.objects.values_list("name", flat=True)))


def model_exists(name: str) -> bool:
    """Whether some deployment serves the public name `name`."""
    return ModelDeployment.objects.filter(name=name).exists()


def deployments() -> QuerySet[ModelDeployment]:
    return ModelDeployment.objects.order_by("name", "id")


def deployment_get(public_id: str) -> ModelDeployment | None:
    return ModelDeployment.objects.filter(public_id=public_id).first()


def aliases() -> QuerySet[ModelAlias]:
    return ModelAlias.objects.order_by("alias")


def alias_get(alias_id: int) -> ModelAlias | None:
    return ModelAlias.objects.filter(id=alias_id).first()


def alias_named(alias: str) -> ModelAlias | None:
    return ModelAlias.objects.filter(alias=alias).first()


def groups() -> QuerySet[ModelGroup]:
    return ModelGroup.objects.all()


def group_get(name: str) -> ModelGroup | None:
    """The routing policy of the public model `name` (None: it uses the defaults)."""
    return ModelGroup.objects.filter(name=name).first()


def groups_by_name(names: Iterable[str]) -> dict[str, ModelGroup]:
    return {g.name: g for g in ModelGroup.objects.filter(name__in=set(names))}
