#!/usr/bin/env bash
# A real Kubernetes API server (etcd + kube-apiserver [+ kube-controller-manager]) for Sluice's
# tests, built offline from Debian's `kubernetes` source package. The same build yields the
# kube-proxy that the cluster box (`cargo xtask cluster`) runs on each node.
#
#   apiserver.sh install                  build and cache the binaries (idempotent, needs root)
#   apiserver.sh status                   say whether the binaries are cached (exit 1 if not)
#   apiserver.sh start DIR [PORT] [--no-controller-manager]
#                                         start etcd + kube-apiserver (+ controller-manager)
#   apiserver.sh stop DIR                 stop everything `start DIR` started
#   apiserver.sh stop-apiserver DIR       stop only kube-apiserver (etcd keeps the data)
#   apiserver.sh start-apiserver DIR      start kube-apiserver again with the same flags
#
# Ports: kube-apiserver listens on 127.0.0.1:PORT (default 16443), etcd's client port is PORT+1
# and its peer port PORT+2, all on loopback, so instances with different PORTs coexist. The
# controller-manager serves no port at all.
#
# Files in DIR: kubeconfig (token auth, CA embedded), certs/, etcd/ (data), *.pid, *.log, port.
set -euo pipefail

# The upstream release that Debian 12 packages. The cache is keyed by it; if Debian ever ships a
# different upstream tree, `install` stops with a clear message instead of silently changing it.
KUBE_VERSION=1.20.2
PREFIX=/opt/sluice-kube/$KUBE_VERSION
BIN_DIR=$PREFIX/bin
# Written last by `install`: its presence proves that a build completed and was copied whole.
STAMP=$PREFIX/build-complete
SRC_LIST=/etc/apt/sources.list.d/sluice-deb-src.sources
DEFAULT_PORT=16443
# What `install` builds from the source tree, in one go so the compiled packages are shared.
BINARIES=(kube-apiserver kube-controller-manager kube-proxy)
READY_TIMEOUT_SECS=60
# Seconds a process gets to exit after SIGTERM before SIGKILL. kube-apiserver stops listening at
# once but then waits up to 60 s for open watch connections to drain; it holds no state (etcd
# does), so it gets a short grace.
STOP_GRACE_SECS=20
APISERVER_STOP_GRACE_SECS=5

log() { echo "apiserver.sh: $*" >&2; }
die() { echo "apiserver.sh: error: $*" >&2; exit 1; }

need_root() {
    [[ $EUID -eq 0 ]] || die "$1 needs root (it installs packages or binds etcd and kube-apiserver)"
}

binaries_cached() {
    local b
    [[ -f $STAMP ]] || return 1
    for b in "${BINARIES[@]}"; do
        [[ -x $BIN_DIR/$b ]] || return 1
    done
}

# Prints, on one line, the Debian packages that `start` needs at run time and that are missing.
missing_runtime_packages() {
    local pair missing=()
    # The box's nodes also need the CNI plugins, kubectl (Debian's kubernetes-client, the same
    # 1.20), and conntrack and iptables for kube-proxy.
    for pair in etcd:etcd-server openssl:openssl curl:curl kubectl:kubernetes-client \
        conntrack:conntrack iptables:iptables /usr/lib/cni/bridge:containernetworking-plugins; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    echo "${missing[*]}"
}

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------

# Writes a private deb822 list that enables deb-src for the machine's own Debian suites. It
# copies URIs, suites, components and keyring from the existing *.sources files, keeping only
# stanzas whose suites belong to this release (e.g. bookworm, bookworm-updates), so third-party
# repositories that publish no sources are left out.
write_deb_src_list() {
    local codename
    # shellcheck disable=SC1091 # a system file
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    [[ -n $codename ]] || die "cannot read VERSION_CODENAME from /etc/os-release"

    local sources=()
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f && $f != "$SRC_LIST" ]] && sources+=("$f")
    done
    [[ ${#sources[@]} -gt 0 ]] || die "no /etc/apt/sources.list.d/*.sources file to take URIs from"

    local content
    content=$(awk -v RS= -v cn="$codename" '
        {
            types = uris = suites = comps = signed = ""
            n = split($0, line, "\n")
            for (i = 1; i <= n; i++) {
                l = line[i]
                if (l ~ /^#/) continue
                if (sub(/^Types:[ \t]*/, "", l))      types = l
                else if (sub(/^URIs:[ \t]*/, "", l))       uris = l
                else if (sub(/^Suites:[ \t]*/, "", l))     suites = l
                else if (sub(/^Components:[ \t]*/, "", l)) comps = l
                else if (sub(/^Signed-By:[ \t]*/, "", l))  signed = l
            }
            if (types !~ /(^|[ \t])deb([ \t]|$)/) next
            m = split(suites, s, /[ \t]+/)
            keep = ""
            for (j = 1; j <= m; j++)
                if (s[j] ~ ("^" cn "(-[a-z]+)?$")) keep = keep (keep == "" ? "" : " ") s[j]
            if (keep == "") next
            print "Types: deb-src"
            print "URIs: " uris
            print "Suites: " keep
            print "Components: " comps
            if (signed != "") print "Signed-By: " signed
            print ""
        }' "${sources[@]}")
    [[ -n $content ]] || die "no '$codename' suite found in ${sources[*]}"

    local header="# Written by Sluice's tests/apiserver/apiserver.sh: deb-src for 'apt-get source kubernetes'."
    if [[ -f $SRC_LIST ]] && [[ "$(cat "$SRC_LIST")" == "$header"$'\n'"$content" ]]; then
        log "deb-src list $SRC_LIST already in place"
    else
        log "writing $SRC_LIST (deb-src for suites of '$codename')"
        printf '%s\n%s\n' "$header" "$content" >"$SRC_LIST"
    fi
}

cmd_install() {
    need_root install
    local missing
    read -ra missing <<<"$(missing_runtime_packages)"
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing run-time packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if binaries_cached; then
        log "binaries for Kubernetes $KUBE_VERSION already cached in $BIN_DIR ($(cat "$STAMP"))"
        return 0
    fi

    # Serialise concurrent installs (two test runs on a fresh machine).
    mkdir -p /opt/sluice-kube
    exec 9>/opt/sluice-kube/install.lock
    log "waiting for the install lock /opt/sluice-kube/install.lock"
    flock 9
    if binaries_cached; then
        log "another install finished meanwhile: binaries cached in $BIN_DIR"
        return 0
    fi

    write_deb_src_list
    log "apt-get update"
    apt-get update -qq

    # golang-go (1.19) builds; jq and rsync are the source package's build dependencies; dpkg-dev
    # and xz-utils unpack the source; reflect2 replaces the vendored copy (below).
    local pkgs=(golang-go golang-github-modern-go-reflect2-dev jq rsync dpkg-dev xz-utils make)
    log "installing build packages: ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null

    # The build needs ~2.2 GB here (source, Go build cache); remove it however we leave. The
    # name is global because the EXIT trap runs after this function's locals are gone.
    BUILD_DIR=$(mktemp -d /var/tmp/sluice-kube-build.XXXXXX)
    trap 'log "removing build dir $BUILD_DIR"; rm -rf "$BUILD_DIR"' EXIT
    local work=$BUILD_DIR

    log "fetching the 'kubernetes' source package into $work"
    # The temp dir is private (mode 700), so download as root rather than apt's sandbox user.
    (cd "$work" && apt-get source -qq -o APT::Sandbox::User=root kubernetes >/dev/null)
    local src
    src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
    [[ -n $src ]] || die "apt-get source kubernetes produced no kubernetes-* directory in $work"
    local deb_version
    deb_version=$(cd "$src" && dpkg-parsechangelog -S Version)
    [[ $deb_version == *"$KUBE_VERSION"* ]] ||
        die "Debian's kubernetes source is $deb_version, not upstream $KUBE_VERSION; update KUBE_VERSION in $0"
    log "source: kubernetes $deb_version"

    # The vendored reflect2 1.0.1 miscompiles with Go 1.19 (kube-apiserver segfaults on the first
    # custom-resource request); Debian's 1.0.2 works.
    local reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
    [[ -d $reflect2 ]] || die "$reflect2 missing (package golang-github-modern-go-reflect2-dev)"
    log "replacing vendor/github.com/modern-go/reflect2 with Debian's $(dpkg-query -W -f '${Version}' golang-github-modern-go-reflect2-dev)"
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -rL "$reflect2" "$src/vendor/github.com/modern-go/reflect2"

    # Offline GOPATH-mode build from vendor/, two jobs at most (the machine is shared), with the
    # Go caches inside the temp dir so nothing is left behind.
    export GOPROXY=off GO111MODULE=off GOFLAGS=-p=2 GOCACHE=$work/gocache GOPATH=$work/gopath
    # Without a .git directory the build scripts take the version from these variables.
    local minor=${KUBE_VERSION#*.}
    export KUBE_GIT_VERSION=v$KUBE_VERSION KUBE_GIT_TREE_STATE=clean
    export KUBE_GIT_MAJOR=${KUBE_VERSION%%.*} KUBE_GIT_MINOR=${minor%%.*}
    local start=$SECONDS
    log "make gen_openapi (generates a file the tarball lacks)"
    (cd "$src" && nice -n 10 make -j2 gen_openapi)
    log "building ${BINARIES[*]} (7 to 10 minutes on 2 cores, up to 20 under load)"
    (cd "$src" && nice -n 10 hack/make-rules/build.sh "${BINARIES[@]/#/cmd/}")
    log "build took $((SECONDS - start)) s"

    local out
    out=$src/_output/local/bin/linux/$(go env GOARCH)
    for b in "${BINARIES[@]}"; do
        [[ -x $out/$b ]] || die "build finished but $out/$b is missing"
    done
    # Build into a fresh directory and swap it in, so a running test keeps its binaries.
    local staging=$PREFIX.new
    rm -rf "$staging"
    mkdir -p "$staging/bin"
    for b in "${BINARIES[@]}"; do cp "$out/$b" "$staging/bin/"; done
    echo "kubernetes $deb_version built $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$staging/build-complete"
    rm -rf "$PREFIX.old"
    [[ -d $PREFIX ]] && mv "$PREFIX" "$PREFIX.old"
    mv "$staging" "$PREFIX"
    rm -rf "$PREFIX.old"
    log "cached ${BINARIES[*]} in $BIN_DIR"
}

INSTALL_HINT="run tests/apiserver/apiserver.sh install (or cargo xtask setup)"

cmd_status() {
    local ok=1 missing
    if binaries_cached; then
        echo "Kubernetes $KUBE_VERSION binaries cached in $BIN_DIR ($(cat "$STAMP"))"
    else
        echo "Kubernetes $KUBE_VERSION binaries not cached in $BIN_DIR: $INSTALL_HINT"
        ok=0
    fi
    missing=$(missing_runtime_packages)
    if [[ -n $missing ]]; then
        echo "missing packages: $missing: $INSTALL_HINT"
        ok=0
    fi
    ((ok))
}

# ---------------------------------------------------------------------------------------------
# start / stop
# ---------------------------------------------------------------------------------------------

require_binaries() {
    binaries_cached ||
        die "${BINARIES[*]} not all cached in $BIN_DIR: $INSTALL_HINT"
    [[ -z $(missing_runtime_packages) ]] ||
        die "missing packages: $(missing_runtime_packages): $INSTALL_HINT"
}

# Reads the PORT that `start DIR` recorded.
read_port() {
    local dir=$1
    [[ -f $dir/port ]] || die "$dir/port missing: was '$0 start $dir' run?"
    cat "$dir/port"
}

# True while PID exists and has not exited. A zombie has exited: the process that adopted it
# (not this script) reaps it.
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z ]]
}

# True if the pid recorded in DIR/NAME.pid is alive and its program is NAME (so a reused pid is
# never signalled).
running() {
    local dir=$1 name=$2 pid argv0
    [[ -f $dir/$name.pid ]] || return 1
    pid=$(cat "$dir/$name.pid")
    alive "$pid" || return 1
    argv0=$(head -z -n1 "/proc/$pid/cmdline" 2>/dev/null | tr -d '\0') || return 1
    [[ ${argv0##*/} == "$name" ]]
}

# Runs a binary in the background with its output in DIR/NAME.log and its pid in DIR/NAME.pid.
launch() {
    local dir=$1 name=$2
    shift 2
    running "$dir" "$name" && die "$name already running (pid $(cat "$dir/$name.pid")) for $dir"
    "$@" >>"$dir/$name.log" 2>&1 </dev/null &
    echo $! >"$dir/$name.pid"
}

# Sends SIGTERM to DIR/NAME.pid, waits up to GRACE seconds for exit, then SIGKILL; returns once
# the process is gone.
stop_process() {
    local dir=$1 name=$2 grace=$3 pid
    if ! running "$dir" "$name"; then
        rm -f "$dir/$name.pid"
        return 0
    fi
    pid=$(cat "$dir/$name.pid")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if alive "$pid"; then
        log "$name (pid $pid) still running ${grace}s after SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do
            sleep 0.1
        done
    fi
    rm -f "$dir/$name.pid"
}

# Polls CHECK ARGS... every 0.5 s until it succeeds; fails with the tail of DIR/NAME.log if the
# process NAME exits first or TIMEOUT seconds pass. (It tests the pid, not the program name, so a
# process caught between fork and exec counts as alive.)
wait_until() {
    local dir=$1 name=$2 timeout=$3
    shift 3
    local deadline=$((SECONDS + timeout)) pid
    pid=$(cat "$dir/$name.pid")
    until "$@" >/dev/null 2>&1; do
        if ! alive "$pid"; then
            fail_with_log "$dir" "$name" "$name exited before it became ready"
        fi
        if ((SECONDS >= deadline)); then
            fail_with_log "$dir" "$name" "$name not ready after ${timeout}s"
        fi
        sleep 0.5
    done
}

fail_with_log() {
    local dir=$1 name=$2 message=$3
    echo "--- last lines of $dir/$name.log ---" >&2
    tail -n 40 "$dir/$name.log" >&2
    die "$message"
}

# A private CA, a serving certificate for 127.0.0.1/localhost signed by it, the service-account
# signing key, and a random admin token. Kept when present, so a restarted DIR stays valid.
make_credentials() {
    local dir=$1 c=$1/certs
    [[ -f $c/done ]] && return 0
    log "generating CA, serving certificate and service-account key in $c"
    mkdir -p "$c"
    # ECDSA P-256 throughout: generated in milliseconds, and accepted by kube-apiserver (serving,
    # service-account tokens as ES256) and by rustls.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -sha256 \
        -keyout "$c/ca.key" -out "$c/ca.crt" -subj "/CN=sluice-test-ca" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$c/apiserver.key" -out "$c/apiserver.csr" \
        -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in "$c/apiserver.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" \
        -CAcreateserial -days 3650 -sha256 -out "$c/apiserver.crt" 2>/dev/null \
        -extfile <(printf '%s\n' \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc")
    openssl ecparam -name prime256v1 -genkey -noout -out "$c/sa.key"
    openssl ec -in "$c/sa.key" -pubout -out "$c/sa.pub" 2>/dev/null
    # Static token file: token,user,uid,"groups". system:masters is bound to cluster-admin.
    local token
    token=$(openssl rand -hex 32)
    echo "$token,admin,admin,\"system:masters\"" >"$c/tokens.csv"
    echo "$token" >"$c/admin.token"
    chmod 600 "$c"/*.key "$c/tokens.csv" "$c/admin.token"
    touch "$c/done"
}

write_kubeconfig() {
    local dir=$1 port=$2
    local ca token
    ca=$(base64 -w0 <"$dir/certs/ca.crt")
    token=$(cat "$dir/certs/admin.token")
    cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $ca
users:
- name: admin
  user:
    token: $token
contexts:
- name: sluice-test
  context:
    cluster: sluice-test
    user: admin
current-context: sluice-test
EOF
    chmod 600 "$dir/kubeconfig"
}

etcd_healthy() {
    local port=$1
    curl -fsS --max-time 2 "http://127.0.0.1:$((port + 1))/health" | grep -q '"health":"true"'
}

apiserver_ready() {
    local dir=$1 port=$2
    curl -fsS --max-time 2 --cacert "$dir/certs/ca.crt" \
        -H "Authorization: Bearer $(cat "$dir/certs/admin.token")" \
        "https://127.0.0.1:$port/readyz"
}

start_etcd() {
    local dir=$1 port=$2
    local client=http://127.0.0.1:$((port + 1)) peer=http://127.0.0.1:$((port + 2))
    log "starting etcd (client $client, data $dir/etcd)"
    mkdir -p "$dir/etcd"
    chmod 700 "$dir/etcd"
    launch "$dir" etcd etcd \
        --name sluice --data-dir "$dir/etcd" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "sluice=$peer" --initial-cluster-state new \
        --logger=zap \
        --heartbeat-interval=50 --election-timeout=250 # one member on loopback: elect in ~0.3 s
    wait_until "$dir" etcd "$READY_TIMEOUT_SECS" etcd_healthy "$port"
}

cmd_start_apiserver() {
    local dir=$1 port c
    require_binaries
    port=$(read_port "$dir")
    c=$dir/certs
    log "starting kube-apiserver on https://127.0.0.1:$port"
    launch "$dir" kube-apiserver "$BIN_DIR/kube-apiserver" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" \
        --insecure-port=0 \
        --etcd-servers="http://127.0.0.1:$((port + 1))" \
        --tls-cert-file="$c/apiserver.crt" --tls-private-key-file="$c/apiserver.key" \
        --cert-dir="$c" \
        --token-auth-file="$c/tokens.csv" \
        --authorization-mode=RBAC \
        --disable-admission-plugins=ServiceAccount \
        --endpoint-reconciler-type=none \
        --service-account-issuer=https://kubernetes.default.svc \
        --service-account-key-file="$c/sa.pub" \
        --service-account-signing-key-file="$c/sa.key" \
        --service-cluster-ip-range=10.96.0.0/16 \
        --profiling=false
    wait_until "$dir" kube-apiserver "$READY_TIMEOUT_SECS" apiserver_ready "$dir" "$port"
    log "kube-apiserver ready on https://127.0.0.1:$port"
}

start_controller_manager() {
    local dir=$1 c=$1/certs
    log "starting kube-controller-manager (namespace deletion, garbage collection, ...)"
    # --port=0/--secure-port=0: serve nothing, so instances never collide on ports. No node
    # lifecycle controller: the box's nodes post no heartbeats, and it would taint and evict.
    launch "$dir" kube-controller-manager "$BIN_DIR/kube-controller-manager" \
        --kubeconfig="$dir/kubeconfig" \
        --port=0 --secure-port=0 \
        --leader-elect=false \
        --controllers='*,-nodelifecycle' \
        --service-account-private-key-file="$c/sa.key" \
        --root-ca-file="$c/ca.crt" \
        --profiling=false
    # It has no readiness endpoint here; catch at least a bad flag or kubeconfig.
    sleep 1
    if ! running "$dir" kube-controller-manager; then
        fail_with_log "$dir" kube-controller-manager "kube-controller-manager exited at start"
    fi
}

cmd_start() {
    local dir=${1:?usage: $0 start DIR [PORT] [--no-controller-manager]}
    local port=$DEFAULT_PORT with_cm=1
    shift
    for arg in "$@"; do
        case $arg in
            --no-controller-manager) with_cm=0 ;;
            *[!0-9]* | '') die "bad PORT or option: $arg" ;;
            *) port=$arg ;;
        esac
    done
    need_root start
    require_binaries
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    echo "$port" >"$dir/port"
    make_credentials "$dir"
    write_kubeconfig "$dir" "$port"
    start_etcd "$dir" "$port"
    cmd_start_apiserver "$dir"
    if ((with_cm)); then
        start_controller_manager "$dir"
    fi
    log "ready: KUBECONFIG=$dir/kubeconfig"
}

cmd_stop() {
    local dir=${1:?usage: $0 stop DIR}
    stop_process "$dir" kube-controller-manager "$STOP_GRACE_SECS"
    stop_process "$dir" kube-apiserver "$APISERVER_STOP_GRACE_SECS"
    stop_process "$dir" etcd "$STOP_GRACE_SECS"
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install ;;
        status) cmd_status ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        stop-apiserver)
            stop_process "${1:?usage: $0 stop-apiserver DIR}" kube-apiserver "$APISERVER_STOP_GRACE_SECS"
            ;;
        start-apiserver) cmd_start_apiserver "${1:?usage: $0 start-apiserver DIR}" ;;
        *)
            sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
            exit 2
            ;;
    esac
}

main "$@"
