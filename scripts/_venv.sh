# Sourced by scripts/*: create (or reuse) .venv with guardd and its test extra installed.
# Reinstalls only when pyproject.toml changed, so repeated runs start fast.
GUARDD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$GUARDD_ROOT/.venv"

ensure_venv() {
    local stamp="$VENV/.guardd-installed" want
    want="$(sha256sum "$GUARDD_ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$GUARDD_ROOT[test]"
        echo "$want" > "$stamp"
    fi
}

# apt_ensure COMMAND PACKAGE: install PACKAGE when COMMAND is missing and we may (root).
apt_ensure() {
    local command="$1" package="$2"
    command -v "$command" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "note: $command is missing and we are not root; tests that need it will skip" >&2
        return 0
    fi
    if [ -z "${GUARDD_APT_UPDATED:-}" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        GUARDD_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
}
