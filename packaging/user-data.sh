#!/bin/sh
# EC2 user_data for a bootstrap node: download the agent, check its pinned sha256, install
# it, and run `bootstrap init` (facts, bundle, converge, units, firstboot marker).
#
# packaging/terraform fills the @...@ placeholders (with replace(), not templatefile(), so
# this stays a plain POSIX script); each value can also come from the environment. Runs under
# `set -eu` with dash, bash or busybox sh: Ubuntu, Debian, Amazon Linux. Needs curl or wget
# (https://) or the AWS CLI (s3://), and sha256sum.
set -eu

URL_DEFAULT='@BOOTSTRAP_URL@'            # https://…/bootstrap or s3://bucket/key
SHA_DEFAULT='@BOOTSTRAP_SHA256@'         # sha256 of that binary
BUNDLE_DEFAULT='@BOOTSTRAP_BUNDLE@'      # e.g. s3://my-roles/roles-${env}.tar.gz (agent substitutes)
ASG_DEFAULT='@BOOTSTRAP_ASG@'            # "true": complete the group's lifecycle hooks ([asg] enabled)
REPORT_DEFAULT='@BOOTSTRAP_REPORT_S3@'   # optional: [report] s3, the node's record for the fleet view
BOOTSTRAP_URL=${BOOTSTRAP_URL:-$URL_DEFAULT}
BOOTSTRAP_SHA256=${BOOTSTRAP_SHA256:-$SHA_DEFAULT}
BOOTSTRAP_BUNDLE=${BOOTSTRAP_BUNDLE:-$BUNDLE_DEFAULT}
BOOTSTRAP_ASG=${BOOTSTRAP_ASG:-$ASG_DEFAULT}
BOOTSTRAP_REPORT_S3=${BOOTSTRAP_REPORT_S3:-$REPORT_DEFAULT}
# More agent config (TOML), written to its own fragment; optional.
BOOTSTRAP_CONFIG=${BOOTSTRAP_CONFIG:-}
BOOTSTRAP_BIN=${BOOTSTRAP_BIN:-/usr/local/bin/bootstrap}

log() { echo "bootstrap user-data: $*" >&2; }
die() { log "$*"; exit 1; }

for v in "$BOOTSTRAP_URL" "$BOOTSTRAP_SHA256" "$BOOTSTRAP_BUNDLE"; do
  case $v in @*@) die "not configured: $v (set it in Terraform or the environment)";; esac
done
case $BOOTSTRAP_SHA256 in
  *[!0-9a-f]*) die "BOOTSTRAP_SHA256 is not a lowercase hex sha256";;
esac
[ ${#BOOTSTRAP_SHA256} -eq 64 ] || die "BOOTSTRAP_SHA256 must be 64 hex digits"

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT INT TERM

case $BOOTSTRAP_URL in
  s3://*)
    command -v aws >/dev/null 2>&1 || die "s3:// needs the AWS CLI; use an https:// URL"
    aws s3 cp --only-show-errors "$BOOTSTRAP_URL" "$tmp" || die "downloading $BOOTSTRAP_URL failed"
    ;;
  https://*|http://*)
    case $BOOTSTRAP_URL in http://*) log "warning: $BOOTSTRAP_URL is not https (the sha256 pin still applies)";; esac
    if command -v curl >/dev/null 2>&1; then
      # Retries cover a network that is still coming up and 5xx answers.
      curl --fail --silent --show-error --location --retry 10 --retry-delay 3 --retry-connrefused \
        --connect-timeout 10 --max-time 300 -o "$tmp" "$BOOTSTRAP_URL" || die "downloading $BOOTSTRAP_URL failed"
    elif command -v wget >/dev/null 2>&1; then
      wget -q --tries=10 --waitretry=3 --timeout=30 -O "$tmp" "$BOOTSTRAP_URL" || die "downloading $BOOTSTRAP_URL failed"
    else
      die "neither curl nor wget is installed"
    fi
    ;;
  *) die "BOOTSTRAP_URL must be https://… or s3://…: $BOOTSTRAP_URL";;
esac

got=$(sha256sum "$tmp" | cut -d' ' -f1)
[ "$got" = "$BOOTSTRAP_SHA256" ] || die "sha256 mismatch for $BOOTSTRAP_URL: got $got, want $BOOTSTRAP_SHA256; not installing"

install -d -m 0755 "$(dirname "$BOOTSTRAP_BIN")" /etc/bootstrap/config.d
install -m 0755 "$tmp" "$BOOTSTRAP_BIN.new"
mv -f "$BOOTSTRAP_BIN.new" "$BOOTSTRAP_BIN"

# The bundle source for init; config.toml and later fragments still win.
printf '# written by the user_data script\n[bundle]\nsource = "%s"\n' "$BOOTSTRAP_BUNDLE" > /etc/bootstrap/config.d/10-user-data.toml
# Auto Scaling lifecycle: hold the launch hook until converged, drain on scale-in (docs/asg.md).
if [ "$BOOTSTRAP_ASG" = true ]; then
  printf '[asg]\nenabled = true\n' >> /etc/bootstrap/config.d/10-user-data.toml
fi
# The node's status record in S3 after every run (docs/rollouts.md, the fleet view).
case $BOOTSTRAP_REPORT_S3 in
  ''|@*@) ;;
  *) printf '[report]\ns3 = "%s"\n' "$BOOTSTRAP_REPORT_S3" >> /etc/bootstrap/config.d/10-user-data.toml;;
esac
if [ -n "$BOOTSTRAP_CONFIG" ]; then
  printf '# written by the user_data script\n%s\n' "$BOOTSTRAP_CONFIG" > /etc/bootstrap/config.d/11-user-data-extra.toml
fi

log "installed $BOOTSTRAP_BIN ($got); running bootstrap init"
exec "$BOOTSTRAP_BIN" init
