"""docker-compose.yml names only things that exist in this repo.

No Docker engine runs on our machines, so the file is parsed, not run: every
service is present and health-checked, and every command points at a module,
management command, Celery app or ASGI application that really exists. Nothing
here imports Django or needs a database.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark: list[pytest.MarkDecorator] = []

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
SERVICES = {"postgres", "redis", "redis-cache", "mock", "web", "worker", "webhooks", "beat"}
PROJECT_SERVICES = {"mock", "web", "worker", "webhooks", "beat"}
SHARED_ENV = {
    "DATABASE_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "GATEWAY_ADMIN_TOKEN",
    "LITELLM_LOCAL_MODEL_COST_MAP",
    "GATEWAY_ENCRYPTION_KEY",
    "GATEWAY_BUDGET_REDIS_URL",
    "GATEWAY_CACHE_REDIS_URL",
    "CELERY_BROKER_URL",
}
# `python -m X` where X is a server that loads an app of ours: check the app instead.
ASGI_SERVERS = {"uvicorn", "granian"}


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def command_argvs(command: str | list[str]) -> list[list[str]]:
    """Split a compose command into the simple commands it runs (`sh -c "a && b"` → [a, b])."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] in (["sh", "-c"], ["bash", "-c"]):
        script = argv[2]
        return [shlex.split(part) for part in re.split(r"&&|;|\|\|", script) if part.strip()]
    return [argv]


def module_exists_in_repo(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def django_core_commands() -> set[str]:
    spec = importlib.util.find_spec("django")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations
    django_dir = Path(next(iter(spec.submodule_search_locations)))
    patterns = ["core/management/commands/*.py", "contrib/*/management/commands/*.py"]
    return {path.stem for pattern in patterns for path in django_dir.glob(pattern)}


def project_commands() -> set[str]:
    return {
        path.stem
        for path in REPO.glob("*/management/commands/*.py")
        if not path.stem.startswith("_") and ".venv" not in path.parts
    }


def module_defines(module: str, name: str) -> bool:
    """Whether the module's top level defines `name` (read with ast, never imported)."""
    path = REPO.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(), filename=str(path))
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    return name in defined


def check_app_reference(reference: str) -> None:
    """`package.module:attribute` must be a repo module that defines the attribute."""
    module, _, attribute = reference.partition(":")
    assert attribute, f"{reference!r} names no attribute"
    assert module_exists_in_repo(module), f"{module} does not exist in the repo"
    assert module_defines(module, attribute), f"{module} does not define {attribute}"


def check_argv(argv: list[str]) -> None:
    program = Path(argv[0]).name
    if program.startswith("python") and argv[1:2] == ["-m"]:
        module = argv[2]
        if module in ASGI_SERVERS:
            apps = [arg for arg in argv[3:] if re.fullmatch(r"[\w.]+:\w+", arg)]
            assert apps, f"{argv}: no app given to {module}"
            check_app_reference(apps[0])
        elif module == "celery":
            check_argv(["celery", *argv[3:]])
        else:
            assert module_exists_in_repo(module), f"python -m {module}: no such module in the repo"
    elif program.startswith("python") and argv[1:2] == ["manage.py"]:
        assert (REPO / "manage.py").is_file()
        name = argv[2]
        assert name in django_core_commands() | project_commands(), (
            f"manage.py {name}: neither a Django command nor */management/commands/{name}.py"
        )
    elif program == "celery":
        app = argv[argv.index("-A") + 1]
        assert app == "config", f"celery -A {app}: expected the config package"
        assert (REPO / "config" / "celery.py").is_file()
        assert module_defines("config.celery", "app"), "config/celery.py defines no `app`"
    elif program == "uvicorn":
        check_app_reference(next(arg for arg in argv[1:] if ":" in arg))
    else:
        pytest.fail(f"don't know how to check command {argv}")


def test_it_has_the_seven_services() -> None:
    assert set(services()) >= SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_it_health_checks_every_service(name: str) -> None:
    service = services()[name]
    healthcheck = service.get("healthcheck")
    one_shot = service.get("restart") == "no"
    assert one_shot or (healthcheck and not healthcheck.get("disable") and healthcheck.get("test"))


@pytest.mark.parametrize("name", sorted(PROJECT_SERVICES))
def test_it_runs_commands_that_exist(name: str) -> None:
    command = services()[name]["command"]
    for argv in command_argvs(command):
        check_argv(argv)


def test_it_waits_for_healthy_dependencies() -> None:
    all_services = services()
    for name, service in all_services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for dependency, rule in depends_on.items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            assert rule.get("condition") == "service_healthy"
            assert all_services[dependency].get("healthcheck"), f"{dependency} has no healthcheck"


@pytest.mark.parametrize("name", ["web", "worker", "webhooks", "beat"])
def test_it_shares_the_gateway_environment(name: str) -> None:
    compose = load_compose()
    assert set(compose["x-gateway-env"]) >= SHARED_ENV
    assert services()[name]["environment"] == compose["x-gateway-env"]


def test_it_web_serves_the_asgi_app_after_migrating() -> None:
    argvs = command_argvs(services()["web"]["command"])
    assert argvs[0][1:] == ["manage.py", "migrate", "--noinput"]
    # The production server, which forks workers serving config.asgi's application.
    assert argvs[-1][1:3] == ["-m", "config.serve"]
    assert module_defines("config.asgi", "application")
    assert "from config.asgi import application" in (REPO / "config/serve.py").read_text()


def test_it_builds_the_image_from_the_hashed_lock() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in dockerfile
    for name in PROJECT_SERVICES:
        assert services()[name].get("build") == "."


# Mount points of the volumes web and worker must share, by the setting that names them.
SHARED_DIRS = {
    "GATEWAY_LEDGER_SPOOL_DIR": "ledger-spool",  # billing/spool.py
    "GATEWAY_FILES_DIR": "gateway-files",  # gateway/files.py (batch input and output)
}


@pytest.mark.parametrize("setting", sorted(SHARED_DIRS))
def test_it_shares_the_spool_and_batch_files_between_web_and_worker(setting: str) -> None:
    compose = load_compose()
    path = compose["x-gateway-env"][setting]
    volume = SHARED_DIRS[setting]
    assert volume in compose["volumes"], f"{volume} is not a named volume"
    # Every Celery worker (beat only sends tasks) runs code that writes the ledger or files.
    workers = [
        name
        for name, service in services().items()
        if name in PROJECT_SERVICES
        and any(
            argv[:1] == ["celery"] and "worker" in argv
            for argv in command_argvs(service["command"])
        )
    ]
    assert workers
    for name in ["web", *workers]:
        mounts = services()[name].get("volumes") or []
        assert f"{volume}:{path}" in mounts, f"{name} does not mount {volume} at {path}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert path in dockerfile, f"the image does not create {path} for the app user"


def _queues(argv: list[str]) -> set[str]:
    """The queues a `celery worker` command consumes (Celery's default: "celery")."""
    if "-Q" not in argv:
        return {"celery"}
    return set(argv[argv.index("-Q") + 1].split(","))


def test_it_runs_webhook_deliveries_on_workers_of_their_own() -> None:
    """A tarpit endpoint must never hold up rollups, invoices or batches (config/celery.py)."""
    consumed: dict[str, set[str]] = {}
    for name, service in services().items():
        for argv in command_argvs(service.get("command") or []):
            if argv[:1] == ["celery"] and "worker" in argv:
                consumed[name] = _queues(argv)
    celery_py = (REPO / "config" / "celery.py").read_text()
    assert 'NOTIFICATIONS_QUEUE = "webhooks"' in celery_py
    assert '"billing.webhook_deliver": {"queue": NOTIFICATIONS_QUEUE}' in celery_py
    assert {n for n, q in consumed.items() if "webhooks" in q} == {"webhooks"}, consumed
    assert {n for n, q in consumed.items() if "celery" in q} == {"worker"}, consumed
    run_sh = (REPO / "scripts" / "run.sh").read_text()
    assert "-Q celery " in run_sh and "-Q webhooks " in run_sh


def _redis_policy(service: str) -> str:
    argv = services()[service]["command"]
    assert argv[0] == "redis-server"
    return str(argv[argv.index("--maxmemory-policy") + 1])


def _redis_service_of(url: str) -> str:
    host = urlsplit(url).hostname
    assert host in services(), f"{url} points at no service of this file"
    return str(host)


def test_it_never_lets_the_cache_evict_budgets_or_the_broker() -> None:
    env = load_compose()["x-gateway-env"]
    budget = _redis_service_of(env["GATEWAY_BUDGET_REDIS_URL"])
    broker = _redis_service_of(env["CELERY_BROKER_URL"])
    cache = _redis_service_of(env["GATEWAY_CACHE_REDIS_URL"])
    assert _redis_policy(budget) == "noeviction"
    assert _redis_policy(broker) == "noeviction"
    assert _redis_policy(cache) == "allkeys-lru"
    assert cache not in {budget, broker}
    # The broker's queues and the budgets share an instance but not a database.
    assert env["CELERY_BROKER_URL"] != env["GATEWAY_BUDGET_REDIS_URL"]
    # The LRU instance has a memory cap to evict within.
    cache_argv = services()[cache]["command"]
    assert cache_argv[cache_argv.index("--maxmemory") + 1]
