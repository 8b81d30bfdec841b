"""A real identity provider (node-oidc-provider, tests/idp/idp.mjs) and a gateway that trusts it.

The IdP's npm packages are installed from tests/idp/package-lock.json on first use
(`npm ci`, offline after that), so a fresh clone needs nothing but node and npm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, LiveGateway, free_port, gateway_env, wait_http

IDP_DIR = ROOT / "tests" / "idp"
CLIENT_ID = "llm-gateway"
CLIENT_SECRET = "test-client-secret-" + "x" * 20
_install_lock = threading.Lock()


def ensure_idp_installed() -> None:
    with _install_lock:
        if (IDP_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
            return
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "npm is missing: the SSO tests run node-oidc-provider (apt-get install npm)."
            )
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=IDP_DIR,
            check=True,
            timeout=300,
        )


@dataclass
class Idp:
    issuer: str
    users_file: Path
    process: subprocess.Popen[bytes]
    users: dict[str, dict[str, Any]] = field(default_factory=dict)

    def set_user(self, login: str, *, password: str, email: str, groups: list[str]) -> None:
        """Add or change a person at the IdP; the next sign-in sees it."""
        self.users[login] = {"password": password, "email": email, "groups": groups}
        self.users_file.write_text(json.dumps(self.users))


@dataclass
class SsoSite:
    idp: Idp
    gateway: LiveGateway


@pytest.fixture(scope="module")
def sso_site(
    django_db_setup: Any,
    django_db_blocker: Any,
    services_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SsoSite]:
    """The IdP and a gateway configured for it, each on its own free port."""
    ensure_idp_installed()
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: the SSO tests run node-oidc-provider.")
    tmp = tmp_path_factory.mktemp("sso")
    idp_port, gateway_port = free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    users_file = tmp / "users.json"
    users_file.write_text("{}")
    idp_log = (tmp / "idp.log").open("wb")
    idp_proc = subprocess.Popen(
        [node, str(IDP_DIR / "idp.mjs")],
        cwd=IDP_DIR,
        env={
            "PATH": "/usr/bin:/bin",
            "IDP_PORT": str(idp_port),
            "IDP_USERS_FILE": str(users_file),
            "IDP_CLIENT_ID": CLIENT_ID,
            "IDP_CLIENT_SECRET": CLIENT_SECRET,
            "IDP_REDIRECT_URI": f"{gateway_url}/sso/callback/",
            "IDP_POST_LOGOUT_REDIRECT_URI": f"{gateway_url}/login/",
        },
        stdout=idp_log,
        stderr=subprocess.STDOUT,
    )
    issuer = f"http://127.0.0.1:{idp_port}"
    gateway_proc = None
    try:
        wait_http(f"{issuer}/.well-known/openid-configuration", proc=idp_proc)
        env = gateway_env(
            services_env,
            GATEWAY_OIDC_ISSUER=issuer,
            GATEWAY_OIDC_CLIENT_ID=CLIENT_ID,
            GATEWAY_OIDC_CLIENT_SECRET=CLIENT_SECRET,
            GATEWAY_OIDC_SCOPES="openid email profile groups",
            GATEWAY_OIDC_ADMIN_GROUPS="platform-admins",
            GATEWAY_OIDC_FINANCE_GROUPS="finance",
        )
        log_path = tmp / "gateway.log"
        log = log_path.open("wb")
        argv = [sys.executable, "-m", "uvicorn", "config.asgi:application"]
        argv += ["--host", "127.0.0.1", "--port", str(gateway_port), "--no-access-log"]
        argv += ["--lifespan", "off"]
        gateway_proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            wait_http(f"{gateway_url}/health/live", timeout=60, proc=gateway_proc)
        except RuntimeError:
            raise RuntimeError(log_path.read_text(errors="replace")[-4000:]) from None
        yield SsoSite(
            idp=Idp(issuer=issuer, users_file=users_file, process=idp_proc),
            gateway=LiveGateway(gateway_url, gateway_proc, env, log_path),
        )
    finally:
        for proc in (gateway_proc, idp_proc):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
