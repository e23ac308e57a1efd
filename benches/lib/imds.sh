# The IMDS test server (examples/imds_server.rs) on a free loopback port, for benches/watch-idle
# and scripts/text-order (sourced).
# start_imds SERVER ROOT LOG: starts SERVER (its instance production-web in us-east-1, tagged
# with an Auto Scaling group), waits until it listens, and points ROOT's agent config
# (ROOT/etc/bootstrap/config.toml) at it. Sets IMDS_PID: the caller's EXIT trap kills it.
start_imds() {
  local server=$1 root=$2 log=$3 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$server" --listen "127.0.0.1:$port" --name production-web --region us-east-1 2>"$log" &
  IMDS_PID=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  mkdir -p "$root/etc/bootstrap"
  printf '[imds]\nbase_url = "http://127.0.0.1:%s"\n' "$port" > "$root/etc/bootstrap/config.toml"
}
