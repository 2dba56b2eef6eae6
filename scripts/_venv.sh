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

# run_bench COMMAND...: a benchmark body. As root, inside a network namespace of its own with only
# `lo` (nothing can leave it; its port space is fresh: tens of thousands of connects leave as many
# sockets in TIME_WAIT, which on the host's loopback would exhaust the ephemeral ports for a
# minute), its resolv.conf naming the bench's own dnsmasq on 127.0.0.1:53 and its nsswitch.conf
# only files and DNS, with --unique-names (no proxy asks the host's resolver); else on the host's
# loopback, without that measure. (Not with nscd running either: its socket is the host's.)
run_bench() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "note: not root, so running on the host's loopback (no namespace of its own," \
            "no unique names)" >&2
        "$@"
        return
    fi
    local netns="guardd-bench-$$" names=--unique-names
    ip netns add "$netns"
    # shellcheck disable=SC2064  # (expanded now: the name is fixed)
    trap "ip netns del '$netns'; rm -rf '/etc/netns/$netns'" EXIT
    mkdir -p "/etc/netns/$netns"  # `ip netns exec` mounts each file there over /etc's
    echo "nameserver 127.0.0.1" >"/etc/netns/$netns/resolv.conf"
    echo "hosts: files dns" >"/etc/netns/$netns/nsswitch.conf"
    printf '127.0.0.1 localhost\n::1 localhost\n' >"/etc/netns/$netns/hosts"
    if [ -S /run/nscd/socket ] || [ -S /var/run/nscd/socket ]; then
        echo "note: nscd runs (it would answer the proxies from the host's resolver):" \
            "no unique names" >&2
        names=
    fi
    ip -n "$netns" link set lo up
    # (At most 16,384 sockets in TIME_WAIT: the connect measures leave more within a minute
    # than the port range holds, and a port taken by one cannot be bound.)
    ip netns exec "$netns" sysctl -q -w net.ipv4.ip_local_port_range="1024 65535" \
        net.ipv4.tcp_tw_reuse=1 net.ipv4.tcp_max_tw_buckets=16384
    ip netns exec "$netns" "$@" ${names:+"$names"}
}
