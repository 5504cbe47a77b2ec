# Shared by the hack/ scripts. Source it; it sets paths and small helpers.
# Everything generated (kernel, initramfs, templates) lives under $ZYGOTE_HOME,
# outside the git tree.
set -euo pipefail

ZYGOTE_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ZYGOTE_SRC
export ZYGOTE_HOME=${ZYGOTE_HOME:-/var/lib/zygote}
export ZYGOTE_KERNEL=${ZYGOTE_KERNEL:-$ZYGOTE_HOME/kernel/vmlinux}
export ZYGOTE_INITRAMFS=${ZYGOTE_INITRAMFS:-$ZYGOTE_HOME/image/initramfs.cpio}

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# apt_install PKG...: installs the Debian packages that are missing.
apt_install() {
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing ${missing[*]}"
	if [ ! -f "$ZYGOTE_HOME/.apt-updated" ]; then
		apt-get update -qq
		mkdir -p "$ZYGOTE_HOME" && touch "$ZYGOTE_HOME/.apt-updated"
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The static-binary target flags for the guest agent.
export AGENT_RUSTFLAGS="-C target-feature=+crt-static"
