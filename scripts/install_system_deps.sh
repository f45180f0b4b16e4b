#!/usr/bin/env bash
# System packages for the GUI tests (napari under a virtual X server). Idempotent.
set -euo pipefail
PKGS="xvfb xauth libgl1 libegl1 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 \
libxkbcommon-x11-0 libdbus-1-3 libfontconfig1"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_system_deps: not a Debian/Ubuntu machine; install these yourself:$missing" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install_system_deps: need root or sudo for:$missing" >&2; exit 1; }
  SUDO=sudo
fi
echo "installing system packages:$missing" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
