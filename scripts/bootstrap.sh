# Sourced by ./kiln and ./run-tests: make sure .venv holds Kiln and everything it needs (./run-tests: and the
# test tools), installing only what is missing and saying what. Safe to run again; a second run costs a file
# check.
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

# ./run-tests asks for the test tools too (KILN_EXTRAS=test); ./kiln installs only what Kiln runs on.
kiln_extras="${KILN_EXTRAS:-}"
kiln_hash="$(sha256sum < "$kiln_root/pyproject.toml" | cut -c1-16)"
kiln_stamp="$kiln_venv/.kiln-installed-$kiln_hash${kiln_extras:+-$kiln_extras}"
if [ ! -f "$kiln_stamp" ] && { [ -n "$kiln_extras" ] || [ ! -f "$kiln_venv/.kiln-installed-$kiln_hash-test" ]; }; then
    if ! "$kiln_venv/bin/python" -c 'import torch' 2>/dev/null; then
        echo "installing ${KILN_TORCH:-torch==2.13.0} into $kiln_venv (once: the CPU build, a few hundred MB;" \
             "for a GPU, install your CUDA build first, see the README)" >&2
        "$kiln_venv/bin/python" -m pip install --progress-bar on "${KILN_TORCH:-torch==2.13.0}" >&2
    fi
    echo "installing Kiln${kiln_extras:+ with its $kiln_extras tools} and what it needs (diffusers, transformers," \
         "celery, sqlalchemy, boto3, ...) into $kiln_venv (once)" >&2
    "$kiln_venv/bin/python" -m pip install --progress-bar on -e "$kiln_root${kiln_extras:+[$kiln_extras]}" >&2
    find "$kiln_venv" -maxdepth 1 -name '.kiln-installed-*' ! -name ".kiln-installed-$kiln_hash*" -delete
    touch "$kiln_stamp"
    echo "$kiln_venv is ready" >&2
fi
