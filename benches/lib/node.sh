# A booted node for benches/peer-bench and scripts/text-order (sourced): systemd-nspawn on an
# overlay of $ROOTFS, private network, its own D-Bus directory, the apt repository $NODE_REPO at
# /srv/benchrepo (a `deb [trusted=yes]` source). Needs T (a scratch directory); NODE_BINDS (an
# array) adds nspawn options, such as --bind-ro=HOST:NODE. The caller's EXIT trap calls stop_node.

NSPAWN=
LEADER=
declare -p NODE_BINDS >/dev/null 2>&1 || NODE_BINDS=()

# stop_node: stop the node (if booted) and drop its overlay.
stop_node() {
  if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
    kill -TERM "$NSPAWN"
    for _ in $(seq 200); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
  fi
  NSPAWN=
  umount "$T/merged" 2>/dev/null || true
  rm -rf "$T/upper" "$T/work" "$T/merged"
}

# boot_node: a fresh node, returns once systemd says running (or degraded).
boot_node() {
  mkdir -p "$T/upper" "$T/work" "$T/merged" "$T/dbus"
  mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$T/upper,workdir=$T/work" "$T/merged"
  : > "$T/merged/etc/machine-id"
  echo "deb [trusted=yes] file:/srv/benchrepo ./" > "$T/merged/etc/apt/sources.list.d/test.list"
  systemd-nspawn -b -D "$T/merged" --register=no --keep-unit --console=read-only -M bench-node \
    --private-network --bind="$T/dbus:/run/dbus" --bind-ro="$NODE_REPO:/srv/benchrepo" \
    "${NODE_BINDS[@]}" >"$T/console.log" 2>&1 &
  NSPAWN=$!
  for _ in $(seq 600); do
    LEADER=$(ps -o pid= --ppid "$NSPAWN" | tr -d ' ' || true)
    if [ -n "$LEADER" ] && nsenter -t "$LEADER" -a systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded'; then
      return
    fi
    sleep 0.1
  done
  echo "node did not boot" >&2; exit 1
}

# in_node CMD...: run CMD inside the node, with a clean environment.
in_node() { nsenter -t "$LEADER" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$@"; }
