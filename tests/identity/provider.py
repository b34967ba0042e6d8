"""A real OpenID Connect provider for the tests: ``django-oidc-provider`` in a minimal
Django project generated here, served over TLS by hypercorn with a certificate made
for the test (the server under test trusts it through ``oidc.ca_file``).

:func:`build_template` migrates a database once per session; :func:`prepare` copies
it for one test (with a new certificate), :func:`seed` adds the users and the client
(with the test's redirect URI); :meth:`ProviderProject.command` serves it.

Users (password ``pw-<username>``):

* ``alice`` — alice@example.com, verified, groups ``staff``
* ``dave`` — dave@example.com, verified, groups ``staff``, ``tailnet-admins``
* ``bob`` — bob@other.org, verified
* ``carol`` — carol@example.com, **not** verified
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from relay.certs import generate_self_signed

CLIENT_ID = "tailledger-test"
CLIENT_SECRET = "client-secret-3f9a1c"  # the tests check that it appears in no output

USERS = {
    "alice": {"email": "alice@example.com", "verified": True, "groups": ["staff"], "name": "Alice Example"},
    "dave": {"email": "dave@example.com", "verified": True, "groups": ["staff", "tailnet-admins"], "name": "Dave Admin"},
    "bob": {"email": "bob@other.org", "verified": True, "groups": [], "name": "Bob Other"},
    "carol": {"email": "carol@example.com", "verified": False, "groups": ["staff"], "name": "Carol Unverified"},
}

_SETTINGS = """
import os
from pathlib import Path
BASE = Path(__file__).resolve().parent
SECRET_KEY = "test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
    "django.contrib.messages", "oidc_provider",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [BASE / "templates"], "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("OIDC_DB", str(BASE / "db.sqlite3"))}}
USE_TZ = True
LOGIN_URL = "/accounts/login/"
SITE_URL = os.environ.get("OIDC_SITE_URL", "https://127.0.0.1")
CSRF_TRUSTED_ORIGINS = [SITE_URL]
OIDC_USERINFO = "claims.userinfo"
OIDC_EXTRA_SCOPE_CLAIMS = "claims.GroupsClaims"
OIDC_IDTOKEN_INCLUDE_CLAIMS = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
"""

_URLS = """
from django.contrib.auth import views as auth_views
from django.urls import include, path
urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view()),
    path("openid/", include("oidc_provider.urls", namespace="oidc_provider")),
]
"""

_CLAIMS = """
import json, os
from oidc_provider.lib.claims import ScopeClaims

def _extra(user):
    return json.loads(user.last_name or "{}")

def userinfo(claims, user):
    extra = _extra(user)
    claims["name"] = extra.get("name", user.username)
    claims["preferred_username"] = user.username
    claims["email"] = user.email
    claims["email_verified"] = extra.get("verified", False)
    return claims

class GroupsClaims(ScopeClaims):
    info_groups = ("Groups", "The groups you are in.")
    def scope_groups(self):
        return {"groups": _extra(self.user).get("groups", [])}
"""

_ASGI = """
import os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
from django.core.asgi import get_asgi_application
application = get_asgi_application()
"""

_LOGIN = """<!doctype html><html><head><title>Test provider: log in</title></head><body>
<h1>Test identity provider</h1>
<form method="post">{% csrf_token %}{{ form.as_p }}<button type="submit" id="login">Log in</button></form>
</body></html>
"""

_SEED = """
import json, os, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
django.setup()
from django.contrib.auth.models import User
from oidc_provider.models import Client, ResponseType
spec = json.loads(sys.argv[1])
for name, u in spec["users"].items():
    extra = json.dumps({"verified": u["verified"], "groups": u["groups"], "name": u["name"]})
    User.objects.create_user(name, email=u["email"], password="pw-" + name, last_name=extra)
client = Client(name="tailledger", client_type="confidential", client_id=spec["client_id"],
                client_secret=spec["client_secret"], require_consent=False, jwt_alg="RS256")
client.redirect_uris = spec["redirect_uris"]
client.scope = ["openid", "profile", "email", "groups"]
client.save()
client.response_types.add(ResponseType.objects.get(value="code"))
"""


@dataclass(frozen=True)
class ProviderProject:
    """One test's provider: its directory, address and TLS files."""

    root: Path
    port: int
    cert: Path
    key: Path

    @property
    def site_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.site_url}/openid"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "OIDC_SITE_URL": self.site_url, "OIDC_DB": str(self.root / "db.sqlite3"),
                "PYTHONPATH": str(self.root), "DJANGO_SETTINGS_MODULE": "settings"}

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "hypercorn", "--certfile", str(self.cert), "--keyfile", str(self.key),
            "--bind", f"127.0.0.1:{self.port}", "--workers", "1", "asgi:application",
        ]


def _write_project(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.py").write_text(_SETTINGS)
    (root / "urls.py").write_text(_URLS)
    (root / "claims.py").write_text(_CLAIMS)
    (root / "asgi.py").write_text(_ASGI)
    (root / "seed.py").write_text(_SEED)
    (root / "templates" / "registration").mkdir(parents=True, exist_ok=True)
    (root / "templates" / "registration" / "login.html").write_text(_LOGIN)


def _manage(root: Path, *args: str, env: dict[str, str]) -> None:
    code = "import sys; from django.core.management import execute_from_command_line; execute_from_command_line(sys.argv)"
    subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, check=True, capture_output=True, timeout=300)


def build_template(root: Path, base_env: dict[str, str]) -> Path:
    """Generate the project and migrate its database, with an RSA signing key."""
    _write_project(root)
    env = {**base_env, "PYTHONPATH": str(root), "DJANGO_SETTINGS_MODULE": "settings", "OIDC_DB": str(root / "db.sqlite3")}
    _manage(root, "migrate", "--noinput", env=env)
    _manage(root, "creatersakey", env=env)
    return root / "db.sqlite3"


def _certificate(root: Path) -> tuple[Path, Path]:
    """The provider's TLS certificate: self-signed for 127.0.0.1 and marked a CA, since
    the server under test is given it as its ``oidc.ca_file``."""
    cert, key = generate_self_signed(["127.0.0.1"], valid_days=2, ca=True)
    cert_path, key_path = root / "provider-cert.pem", root / "provider-key.pem"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    return cert_path, key_path


def prepare(template_db: Path, root: Path, port: int) -> ProviderProject:
    """One test's provider project: the template database and a TLS certificate."""
    _write_project(root)
    shutil.copyfile(template_db, root / "db.sqlite3")
    cert, key = _certificate(root)
    return ProviderProject(root, port, cert, key)


def seed(project: ProviderProject, redirect_uris: list[str], base_env: dict[str, str]) -> None:
    """Add the users and the client (accepting these redirect URIs)."""
    spec = {"users": USERS, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": redirect_uris}
    subprocess.run(
        [sys.executable, "seed.py", json.dumps(spec)], cwd=project.root, env=project.env(base_env),
        check=True, capture_output=True, timeout=120,
    )
