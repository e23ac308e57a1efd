# The benchmark role, shared by benches/peer-bench and benches/first-boot (sourced):
# 2 packages, 40 templated files, 12 directories, 5 unit files enabled, a templated haproxy.cfg
# notifying haproxy. The same role as a bootstrap role, a cloud-config, and a verify script
# that prints the end state (the same listing, hence the same digest, whichever tool made it).

# bench_role_toml: the bootstrap role (roles/bench/role.toml) on stdout.
bench_role_toml() {
  echo 'schema = 1'
  echo '[vars]'
  echo 'greeting = "hello from the benchmark"'
  echo 'maxconn = 2000'
  echo '[[step]]'
  echo 'kind = "package"'
  echo 'names = ["haproxy", "hello"]'
  printf '[[step]]\nkind = "directory"\npath = "/etc/bench"\nmode = "0755"\n'
  printf '[[step]]\nkind = "directory"\npath = "/srv/data"\nmode = "0755"\n'
  # One step per loop (for_each), as Ansible's `loop` and Puppet's arrays of titles.
  printf '[[step]]\nkind = "directory"\nfor_each = [%s]\npath = "/srv/data/d{{ item }}"\nmode = "0755"\n' "$(seq -s, 10)"
  printf '[[step]]\nkind = "file"\nfor_each = [%s]\npath = "/etc/bench/conf-{{ item }}.conf"\ncontent = "# file {{ item }}\\ngreeting = {{ greeting }}\\nhost = {{ facts.hostname }}\\n"\ntemplate = true\nmode = "0644"\n' "$(seq -s, 40)"
  printf '[[step]]\nkind = "unit"\nfor_each = [%s]\nname = "bench-{{ item }}.service"\ncontent = "[Unit]\\nDescription=bench {{ item }}\\n[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n"\ntemplate = true\nenabled = true\n' "$(seq -s, 5)"
  printf '[[step]]\nkind = "file"\npath = "/etc/haproxy/haproxy.cfg"\ncontent = "global\\n  maxconn {{ maxconn }}\\ndefaults\\n  mode http\\n  timeout connect 5s\\n  timeout client 30s\\n  timeout server 30s\\nfrontend www\\n  bind 127.0.0.1:80\\n  default_backend app\\nbackend app\\n  server a 127.0.0.1:8080\\n"\ntemplate = true\nmode = "0644"\nnotify = ["restart:haproxy.service"]\n'
  printf '[[step]]\nkind = "unit"\nname = "haproxy.service"\nenabled = true\nactive = true\n'
}

# bench_cloud_config: the same role as cloud-init user-data (a cloud-config given through the
# NoCloud seed). write_files runs early (cloud-init's init stage); haproxy.cfg is deferred to
# the final stage, after the packages; runcmd (run at the end of the final stage) makes the
# directories, enables the units and restarts haproxy. The hostname comes from cloud-init's
# instance data, as bootstrap's comes from its facts.
bench_cloud_config() {
  echo '## template: jinja'
  echo '#cloud-config'
  echo 'apt:'
  echo '  preserve_sources_list: true'
  echo 'package_update: true'
  echo 'packages: [haproxy, hello]'
  echo 'write_files:'
  for i in $(seq 40); do
    printf '  - path: /etc/bench/conf-%s.conf\n    permissions: "0644"\n    content: |\n      # file %s\n      greeting = hello from the benchmark\n      host = {{ v1.local_hostname }}\n' "$i" "$i"
  done
  for i in $(seq 5); do
    printf '  - path: /etc/systemd/system/bench-%s.service\n    permissions: "0644"\n    content: |\n      [Unit]\n      Description=bench %s\n      [Service]\n      ExecStart=/bin/sleep infinity\n      [Install]\n      WantedBy=multi-user.target\n' "$i" "$i"
  done
  printf '  - path: /etc/haproxy/haproxy.cfg\n    permissions: "0644"\n    defer: true\n    content: |\n'
  printf '      %s\n' 'global' '  maxconn 2000' 'defaults' '  mode http' '  timeout connect 5s' '  timeout client 30s' \
    '  timeout server 30s' 'frontend www' '  bind 127.0.0.1:80' '  default_backend app' 'backend app' '  server a 127.0.0.1:8080'
  echo 'runcmd:'
  echo "  - [mkdir, -p, -m, '0755', /etc/bench, /srv/data, $(seq -s, -f ' /srv/data/d%g' 10 | sed 's/^ //')]"
  echo '  - [systemctl, daemon-reload]'
  echo "  - [systemctl, enable, $(seq -s, -f ' bench-%g.service' 5 | sed 's/^ //'), haproxy.service]"
  echo '  - [systemctl, restart, haproxy.service]'
}

# bench_verify: a shell script (run inside the node) printing the role's end state: package
# states and versions, every directory's and file's type, mode, owner and content hash, the
# units' enablement, haproxy active and listening on the configured address.
bench_verify() {
  cat <<'VERIFY'
dpkg-query -W -f '${Package} ${Version} ${db:Status-Status}\n' haproxy hello
for d in /etc/bench /srv/data $(seq -f /srv/data/d%g 10); do stat -c '%n %F %a %U:%G' "$d"; done
for f in $(seq -f /etc/bench/conf-%g.conf 40) $(seq -f /etc/systemd/system/bench-%g.service 5) /etc/haproxy/haproxy.cfg; do
  echo "$(stat -c '%n %F %a %U:%G' "$f") $(sha256sum < "$f" | cut -c1-16)"
done
for u in $(seq -f bench-%g.service 5) haproxy.service; do echo "$u $(systemctl is-enabled "$u")"; done
echo "haproxy.service $(systemctl is-active haproxy.service)"
echo "listening on $(ss -ltnH | awk '{print $4}' | grep -x '127.0.0.1:80')"
VERIFY
}
