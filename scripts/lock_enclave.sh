#!/usr/bin/env bash
# Regenerate requirements/enclave.txt (hash-locked) from requirements/enclave.in.
#
# pip-tools runs from a throw-away virtualenv so it never enters the project's dependencies. The lock is
# constrained to requirements/lock.txt: the enclave runs exactly the versions the test suite ran.
# Resolve on CPython 3.11 linux x86_64 (the base image's platform). torch's +cpu build comes from
# PyTorch's CPU index; pass PIP_FIND_LINKS=DIR instead when working from a local wheel mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${PIPTOOLS_VENV:-.nitrovault/piptools-venv}"
if [[ ! -x "$tools/bin/pip-compile" ]]; then
    python3.11 -m venv "$tools"
    "$tools/bin/pip" install -q 'pip-tools==7.6.2'
fi
"$tools/bin/pip-compile" --generate-hashes --allow-unsafe --strip-extras --no-header \
    --no-emit-find-links --no-emit-index-url \
    --extra-index-url https://download.pytorch.org/whl/cpu \
    -c requirements/lock.txt -o requirements/enclave.txt.new requirements/enclave.in
# keep the hand-written header (everything up to the first blank line) of the current lock file
{ sed '/^$/q' requirements/enclave.txt; cat requirements/enclave.txt.new; } > requirements/enclave.txt.tmp
mv requirements/enclave.txt.tmp requirements/enclave.txt
rm -f requirements/enclave.txt.new
echo "wrote requirements/enclave.txt ($(grep -c '==' requirements/enclave.txt) pins)"
