#!/usr/bin/env bash
# Idempotent set-up: system packages (Vulkan/EGL/OSMesa for ManiSkill and LIBERO), a virtual environment in .venv,
# the pinned requirements and this project (editable). Re-running it skips whatever is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# ---- system packages ---------------------------------------------------------------------------------------------
# ManiSkill's SAPIEN needs a Vulkan device even for state observations; on a CPU machine that is Mesa's lavapipe,
# and only Mesa >= 24 (Debian's bookworm-backports) has the extensions SAPIEN asks for. LIBERO renders with EGL/OSMesa.
apt_ok=1
[ "${SKIP_APT:-0}" = 1 ] && echo "[setup] SKIP_APT=1: not checking system packages"
for pkg in libvulkan1 libegl1 libgl1 libosmesa6 mesa-vulkan-drivers; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || apt_ok=0
done
if [ $apt_ok = 1 ]; then
  mesa=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)
  dpkg --compare-versions "$mesa" ge 24 || apt_ok=0
fi
APT_CMDS='mirror=$(awk '"'"'/^URIs:/ {print $2; exit}'"'"' /etc/apt/sources.list.d/debian.sources)
echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/backports.list
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y libvulkan1 libegl1 libgl1 libosmesa6
DEBIAN_FRONTEND=noninteractive apt-get install -y -t bookworm-backports mesa-vulkan-drivers'
if [ $apt_ok = 0 ] && [ "${SKIP_APT:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Vulkan (Mesa from bookworm-backports), EGL and OSMesa"
    bash -ec "$APT_CMDS"
  else
    echo "[setup] missing system packages: ManiSkill needs Mesa >= 24 Vulkan (lavapipe), LIBERO needs EGL/OSMesa." >&2
    echo "[setup] install them as root, then run this command again:" >&2
    echo "    sudo bash scripts/setup.sh --system-only" >&2
    echo "[setup] which runs (Debian 12):" >&2
    echo "$APT_CMDS" | sed 's/^/    /' >&2
    exit 1
  fi
fi

[ "${1:-}" = "--system-only" ] && { echo "[setup] system packages are in place"; exit 0; }

# ---- virtual environment ----------------------------------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "[setup] warning: $("$PYTHON" --version) found; the pinned set is tested on Python 3.11" >&2
fi
[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PYTHON" -m venv "$VENV"; }
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)  # (this file pins pip)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt into $VENV (about 2 minutes the first time)"
  "$VENV/bin/python" -m pip install -q pip==26.3  # pinned too: a new pip may resolve the set differently
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  # A CUDA torch here means something pulled it in: stop rather than run on the wrong build.
  "$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; sys.exit(0 if "+cpu" in v or not torch.version.cuda else f"[setup] a CUDA torch ({v}) was installed; see README, GPU section")' \
    || [ "${ALLOW_CUDA_TORCH:-0}" = 1 ]
  echo "$want" > "$stamp"
else
  echo "[setup] $VENV is up to date"
fi

# ---- numpy 1 side directory for ManiSkill motion planning ----------------------------------------------------------
# mplib 0.1.1 (ManiSkill's motion planner) segfaults under numpy 2. `common.maniskill_demos` runs the planner in a
# subprocess with this directory first on PYTHONPATH, so numpy 1.26.4 shadows the venv's numpy 2 there only.
NUMPY1="$VENV/numpy1"
if [ -f "$NUMPY1/numpy-1.26.4.dist-info/METADATA" ]; then
  echo "[setup] $NUMPY1 (numpy 1.26.4 for the motion planner) is in place"
else
  echo "[setup] installing numpy 1.26.4 into $NUMPY1 (used only by the ManiSkill motion planner)"
  rm -rf "$NUMPY1"
  "$VENV/bin/python" -m pip install -q --no-deps --target "$NUMPY1" numpy==1.26.4
fi
