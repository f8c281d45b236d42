#!/usr/bin/env bash
# Build the enclave image and its PCR manifest:
#   0. scripts/enclave_config.py -> the measured config: the sealed model's digest pinned, Amazon Trust
#      Services' roots as the KMS CA bundle unless the config has its own (build fails on a bad config),
#   1. docker build (enclave_app/Dockerfile; the measured config passed as the "config" build context),
#   2. nitro-cli build-enclave -> enclave.eif (signed for PCR8 when a certificate and key are given),
#   3. scripts/pcr_manifest.py -> pcr-manifest.json (PCR0/1/2/8 from nitro-cli, cross-checked against the
#      EIF measured in pure Python; image digest, source commit, build time).
#
# Usage:
#   scripts/build_enclave.sh --config enclave.json --sealed-model model.sealed
#       [--tag nitrovault-enclave:dev] [--out-dir build/]
#       [--signing-certificate cert.pem --private-key key.pem] [--built-at 2025-01-01T00:00:00Z] [--dry-run]
#       [--state-store-endpoint HOST [--state-store-ca ca.pem]]   (the CDK output StateStoreEndpointAddress)
#
# --dry-run prints every command it would run (one per line, shell-quoted, prefixed with "+ ") and runs
# none of them: docker and nitro-cli need a Nitro-enabled host, and reviewers can read what happens.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python="python3"

config="" sealed="" tag="nitrovault-enclave:latest" out_dir="$repo/build" cert="" key="" built_at="" dry_run=0
store_args=()

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) config="${2:?}"; shift 2 ;;
        --sealed-model) sealed="${2:?}"; shift 2 ;;
        --tag) tag="${2:?}"; shift 2 ;;
        --out-dir) out_dir="${2:?}"; shift 2 ;;
        --signing-certificate) cert="${2:?}"; shift 2 ;;
        --private-key) key="${2:?}"; shift 2 ;;
        --built-at) built_at="${2:?}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --state-store-endpoint) store_args+=(--state-store-endpoint "${2:?}"); shift 2 ;;
        --state-store-ca) store_args+=(--state-store-ca "${2:?}"); shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done

[[ -n "$config" ]] || { echo "error: --config FILE (the measured enclave config) is required" >&2; exit 2; }
[[ -f "$config" ]] || { echo "error: config $config does not exist" >&2; exit 2; }
[[ -n "$sealed" ]] || { echo "error: --sealed-model FILE is required (the image serves exactly that model)" >&2; exit 2; }
[[ -f "$sealed" ]] || { echo "error: sealed model $sealed does not exist" >&2; exit 2; }
if [[ -n "$cert" && -z "$key" ]] || [[ -z "$cert" && -n "$key" ]]; then
    echo "error: --signing-certificate and --private-key go together" >&2; exit 2
fi
[[ -n "$built_at" ]] || built_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
commit="$(git -C "$repo" rev-parse HEAD 2>/dev/null || true)"
if [[ -n "$(git -C "$repo" status --porcelain -- enclave_app nitrovault requirements 2>/dev/null || true)" ]]; then
    echo "warning: uncommitted changes in the measured sources; source_commit will not describe the image" >&2
fi

run() {
    if [[ "$dry_run" == 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

eif="$out_dir/enclave.eif"
build_json="$out_dir/build-enclave.json"
manifest="$out_dir/pcr-manifest.json"
context_dir="$out_dir/config-context"

run mkdir -p "$out_dir" "$context_dir"
run "$python" "$repo/scripts/enclave_config.py" --config "$config" --sealed-model "$sealed" \
    --output "$context_dir/enclave.json" ${store_args[@]+"${store_args[@]}"}

# 1. the docker image (the measured config enters only through the "config" build context)
run docker build --file "$repo/enclave_app/Dockerfile" --build-context "config=$context_dir" \
    --tag "$tag" "$repo"
if [[ "$dry_run" == 1 ]]; then
    image_digest="sha256:$(printf '0%.0s' {1..64})"
    echo "+ image_digest=\$(docker image inspect --format '{{.Id}}' $tag)"
else
    image_digest="$(docker image inspect --format '{{.Id}}' "$tag")"
fi

# 2. the EIF; nitro-cli prints {"Measurements": {"PCR0": ...}} on stdout
sign=()
[[ -n "$cert" ]] && sign=(--signing-certificate "$cert" --private-key "$key")
if [[ "$dry_run" == 1 ]]; then
    run nitro-cli build-enclave --docker-uri "$tag" --output-file "$eif" "${sign[@]}"
    echo "+ (stdout saved to $build_json)"
else
    nitro-cli build-enclave --docker-uri "$tag" --output-file "$eif" "${sign[@]}" > "$build_json"
fi

# 3. the manifest (nitro-cli's PCRs must equal our own reading of the EIF, or the build fails)
manifest_args=(--nitro-cli-json "$build_json" --eif "$eif" --image-digest "$image_digest"
               --built-at "$built_at" --output "$manifest")
[[ -n "$commit" ]] && manifest_args+=(--source-commit "$commit")
run "$python" "$repo/scripts/pcr_manifest.py" "${manifest_args[@]}"

echo "done: $eif, $manifest" >&2
