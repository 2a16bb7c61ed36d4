# Shared by benches/etcd-compare and benches/footprint (sourced): a 3-member etcd and a 3-node
# spaced cluster on 127.0.0.1. The caller sets `work` (a scratch dir), `base` (the first of the
# ports: spaced uses base+1..3 and base+31..33, etcd base+11..13 and base+21..23), `pids` (an
# array the caller's cleanup kills), SPACED_BIN, SPACECTL_BIN, and defines `say`.

# start_etcd3: starts the members and waits for a leader; sets etcd_all (every client URL) and
# etcd_leader (the leader's), exports ETCDCTL_API=3; the members' pids go to etcd_pids too.
# Returns 1 if no leader is elected.
start_etcd3() {
    local cluster="" i
    for i in 1 2 3; do
        cluster+="${cluster:+,}e$i=http://127.0.0.1:$((base + 20 + i))"
    done
    for i in 1 2 3; do
        etcd --name "e$i" --data-dir "$work/etcd$i" \
            --listen-client-urls "http://127.0.0.1:$((base + 10 + i))" \
            --advertise-client-urls "http://127.0.0.1:$((base + 10 + i))" \
            --listen-peer-urls "http://127.0.0.1:$((base + 20 + i))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((base + 20 + i))" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token spaced-bench >"$work/etcd$i.log" 2>&1 &
        pids+=($!)
        etcd_pids+=($!)
    done
    etcd_all="http://127.0.0.1:$((base + 11)),http://127.0.0.1:$((base + 12)),http://127.0.0.1:$((base + 13))"
    export ETCDCTL_API=3
    etcd_leader=""
    for _ in $(seq 100); do
        etcd_leader="$(etcdctl --endpoints="$etcd_all" endpoint status -w json 2>/dev/null | python3 -c '
import json, sys
for s in json.load(sys.stdin):
    if s["Status"]["header"]["member_id"] == s["Status"]["leader"]:
        print(s["Endpoint"])' || true)"
        [ -n "$etcd_leader" ] && break
        sleep 0.2
    done
    [ -n "$etcd_leader" ] || { say "etcd elected no leader"; tail -5 "$work"/etcd*.log >&2; return 1; }
    say "etcd leader: $etcd_leader ($(etcd --version | head -1))"
}

# ctl ARGS...: spacectl against spaced node 1 with the bench's admin certificate.
ctl() { "$SPACECTL_BIN" --pki "$work/pki" --endpoint "127.0.0.1:$((base + 1))" "$@"; }

# start_spaced3: makes a PKI, starts n1 (bootstrap), n2, n3 (role app) and adds n2 and n3; the
# nodes' pids go to spaced_pids too. $SPACED_EXTRA_CONFIG (TOML) ends each node's config. Returns 1 if a node cannot be added.
start_spaced3() {
    local i boot
    "$SPACECTL_BIN" pki init --dir "$work/pki" >/dev/null
    "$SPACECTL_BIN" pki issue --dir "$work/pki" --name bench --admin >/dev/null
    for i in 1 2 3; do
        "$SPACECTL_BIN" pki issue --dir "$work/pki" --name "n$i" >/dev/null
        cat >"$work/n$i.toml" <<EOF
node_id = $i
name = "n$i"
data_dir = "$work/spaced$i"
listen = "127.0.0.1:$((base + i))"
roles = ["app"]
[devices]
listen = "127.0.0.1:$((base + 30 + i))"
[tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/n$i.pem"
key = "$work/pki/n$i.key"
${SPACED_EXTRA_CONFIG:-}
EOF
        if [ "$i" = 1 ]; then boot=--bootstrap; else boot=; fi
        "$SPACED_BIN" run --config "$work/n$i.toml" $boot >"$work/spaced$i.log" 2>&1 &
        pids+=($!)
        spaced_pids+=($!)
    done
    for _ in $(seq 100); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done
    for i in 2 3; do
        ctl node add --id "$i" --name "n$i" --addr "127.0.0.1:$((base + i))" >/dev/null ||
            { say "node add n$i failed"; tail -5 "$work"/spaced*.log >&2; return 1; }
    done
    say "spaced: $(ctl status | head -1)"
}
