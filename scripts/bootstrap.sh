# Sourced by ./kiln and ./run-tests: make sure .venv holds Kiln and everything it needs, installing only
# what is missing. Safe to run again; a second run costs a file check.
#   KILN_VENV   where the virtual environment lives   [default: .venv beside this checkout]
#   PYTHON      the Python (3.11+) that creates it    [default: python3]
#   KILN_TORCH  what pip installs when torch is absent [default: torch==2.13.0]. GPU users install their
#               CUDA build of torch into the venv first (README), and this script leaves it alone.
kiln_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kiln_venv="${KILN_VENV:-$kiln_root/.venv}"
kiln_python="${PYTHON:-python3}"

if [ ! -x "$kiln_venv/bin/python" ]; then
    if ! "$kiln_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: Kiln needs Python 3.11 or newer; '$kiln_python' is $("$kiln_python" --version 2>&1)." \
             "Install one and run again with PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    echo "creating $kiln_venv" >&2
    "$kiln_python" -m venv "$kiln_venv"
fi

kiln_stamp="$kiln_venv/.kiln-installed-$(cat "$kiln_root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$kiln_stamp" ]; then
    if ! "$kiln_venv/bin/python" -c 'import torch' 2>/dev/null; then
        echo "installing ${KILN_TORCH:-torch==2.13.0} (once)" >&2
        "$kiln_venv/bin/python" -m pip install --quiet "${KILN_TORCH:-torch==2.13.0}"
    fi
    echo "installing Kiln and its dependencies into $kiln_venv (once)" >&2
    "$kiln_venv/bin/python" -m pip install --quiet -e "$kiln_root[test]"
    rm -f "$kiln_venv"/.kiln-installed-*
    touch "$kiln_stamp"
fi
