#!/usr/bin/env bash
# Set up vdiskfs (see setup.sh) and run its whole test suite. Arguments go to pytest.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VDISKFS_VENV:-$repo/.venv}

"$repo/contrib/setup.sh"
cd "$repo"
exec "$venv/bin/python" -m pytest -q "$@"
