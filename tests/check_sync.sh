#!/usr/bin/env bash
# Fail when notebooks carry outputs/metadata, or when taide_ft/ is not what nbdev_export writes from them.
set -euo pipefail
cd "$(dirname "$0")/.."
nbdev_clean
if [ -n "$(git status --porcelain -- nbs)" ]; then
  echo "Detected unstripped out notebooks: run nbdev_clean and commit."; git status --short -- nbs; exit 1
fi
nbdev_export
if [ -n "$(git status --porcelain -- taide_ft)" ]; then
  echo "Notebooks and library are not in sync: run nbdev_export and commit taide_ft/."; git status --short -- taide_ft; git diff --stat -- taide_ft; exit 1
fi
echo "notebooks clean, library in sync"
