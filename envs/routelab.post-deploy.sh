#!/usr/bin/env bash
# Runs inside the new environment right after Snakemake creates it (--sdm conda), in the directory
# snakemake was started from: the repository root. Installs routelab from this checkout, editable so
# that library changes reach the jobs; its dependencies are pinned in the environment file.
# tracking.post-deploy.sh is a link to this script.
set -euo pipefail
if [ ! -f pyproject.toml ] || [ ! -d src/routelab ]; then
    echo "routelab.post-deploy.sh: run snakemake from the routelab repository root (now in $PWD)" >&2
    exit 1
fi
python -m pip install --no-deps -e .
