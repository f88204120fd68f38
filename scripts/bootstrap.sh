#!/usr/bin/env bash
# Sets up everything the build and the tests need, once; quick when already done.
#  1. .venv: a project-local Python environment with python/requirements.txt (torch 2.13.0 and friends).
#  2. .libtorch: a link to the wheel's torch/ folder; .cargo/config.toml points tch at it.
# Nothing is downloaded except from the package registries (pip); no LIBTORCH to set by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv
requirements=python/requirements.txt
stamp="$venv/.requirements.sha256"

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi

want=$(sha256sum "$requirements" | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "bootstrap: installing $requirements into $venv (torch is ~5 GB with its CUDA libraries)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$want" > "$stamp"
fi

torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
if [ "$(readlink .libtorch 2>/dev/null || true)" != "$torch_dir" ]; then
  ln -sfn "$torch_dir" .libtorch
fi
test -f .libtorch/lib/libtorch_cpu.so || { echo "bootstrap: $torch_dir/lib/libtorch_cpu.so missing" >&2; exit 1; }
echo "bootstrap: ok (libtorch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') at .libtorch)"
