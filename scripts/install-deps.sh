#!/usr/bin/env bash
# Installs the Debian packages that building and testing Switchyard need.
# Pingora's zlib-ng build runs cmake; the tests use curl, openssl, h2load
# and the pebble ACME test CA. Packages already present are skipped.
set -euo pipefail

packages=(cmake gcc make curl openssl ca-certificates nghttp2-client pebble python3-venv)
missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if ((${#missing[@]} > 0)); then
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        sudo="sudo"
    fi
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
