"""Promise 12: what runs is what was locked, and nothing runs at interpreter start-up.

- No unexpected `.pth` file in the interpreter's site-packages: a `.pth` line that
  starts with `import` runs on every Python start (how the compromised litellm 1.82.7
  and 1.82.8 releases ran their payload; 1.107.0 was compromised too).
- litellm is not one of those releases, and neither lock file pins them.
- Both lock files pin every package to one version with sha256 hashes, and the
  Makefile and Dockerfile install only with `--require-hashes`.
"""

from __future__ import annotations

import re
import site
import sysconfig
from importlib import metadata
from pathlib import Path

from tests.support.live import ROOT

COMPROMISED_LITELLM = {"1.82.7", "1.82.8", "1.107.0"}
# .pth files that setuptools, virtualenv and editable installs legitimately add.
ALLOWED_PTH = {"distutils-precedence.pth", "_virtualenv.pth"}
ALLOWED_PTH_PATTERNS = (
    re.compile(r"^__editable__\..+\.pth$"),
    re.compile(r"^_.+_editable\.pth$"),
)
LOCKS = ("requirements.lock", "requirements-dev.lock")
BOOTSTRAP = re.compile(
    r"if \[ -f requirements-dev\.lock \]; then\s+\$\(MAKE\) \$\(VENV\)/\.installed-dev;"
    r"\s+else\s+\$\(PIP\) install pip-tools==[0-9.]+;\s+fi"
)
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


def site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths.update(site.getsitepackages())
    return sorted(Path(p) for p in paths if Path(p).is_dir())


def test_site_packages_hold_no_unexpected_pth_file():
    found = [path for directory in site_packages() for path in directory.glob("*.pth")]
    unexpected = [
        str(path)
        for path in found
        if path.name not in ALLOWED_PTH
        and not any(pattern.match(path.name) for pattern in ALLOWED_PTH_PATTERNS)
    ]
    assert unexpected == [], f"unexpected .pth files run code at start-up: {unexpected}"


def test_litellm_is_not_a_compromised_release():
    installed = metadata.version("litellm")
    assert installed not in COMPROMISED_LITELLM, f"litellm {installed} is a compromised release"
    for lock in LOCKS:
        pins = dict(pinned(ROOT / lock))
        assert pins.get("litellm") not in COMPROMISED_LITELLM, (lock, pins.get("litellm"))
    assert installed == dict(pinned(ROOT / "requirements.lock"))["litellm"], installed


def pinned(lock: Path) -> list[tuple[str, str]]:
    """(name, version) of every requirement; asserts each has a version pin and hashes."""
    entries: list[tuple[str, str]] = []
    current: tuple[str, str] | None = None
    hashes = 0
    problems: list[str] = []

    def close() -> None:
        if current is not None and hashes == 0:
            problems.append(f"{current[0]}=={current[1]} has no --hash")

    for line in lock.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if stripped.startswith("--hash="):
                if not re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( \\)?", stripped):
                    problems.append(f"{current}: not a sha256 hash: {stripped}")
                hashes += 1
            continue
        close()
        match = REQUIREMENT.match(stripped)
        if not match:
            problems.append(f"not pinned with ==: {stripped}")
            current, hashes = None, 0
            continue
        current, hashes = (match["name"].lower().replace("_", "-"), match["version"]), 0
        entries.append(current)
    close()
    assert problems == [], f"{lock.name}: {problems}"
    assert len(entries) > 20, f"{lock.name} pins suspiciously few packages"
    return entries


def test_every_locked_package_is_pinned_with_sha256_hashes():
    for lock in LOCKS:
        pins = pinned(ROOT / lock)
        names = [name for name, _ in pins]
        assert len(names) == len(set(names)), f"{lock} pins a package twice"


def test_dependencies_are_installed_only_with_require_hashes():
    makefile = (ROOT / "Makefile").read_text()
    # The install command every lock-based target uses.
    assert re.search(r"^PIP_INSTALL\s*:=.*\binstall --require-hashes\b", makefile, re.M), makefile
    installs = [
        line.strip()
        for line in makefile.replace("\\\n", " ").splitlines()
        if re.search(r"\$\(PIP(_INSTALL)?\)\s+install|\bpip\s+install|\$\(PIP_INSTALL\)", line)
    ]
    unhashed = [
        line
        for line in installs
        if "--require-hashes" not in line
        and "$(PIP_INSTALL)" not in line
        # Bootstrap of pip-tools, only when there is no dev lock yet to install it from.
        and not re.search(BOOTSTRAP, line)
    ]
    assert installs, "the Makefile installs nothing?"
    assert unhashed == [], unhashed
    for lock in LOCKS:
        assert re.search(rf"\$\(PIP_INSTALL\) -r {re.escape(lock)}", makefile), lock
    dockerfile = (ROOT / "Dockerfile").read_text()
    docker_installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert docker_installs, "the Dockerfile installs nothing?"
    assert all("--require-hashes" in line for line in docker_installs), docker_installs
