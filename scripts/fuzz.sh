#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a while from the committed seed
# corpus; fails if any target crashes or breaks one of its assertions.
#
#   scripts/fuzz.sh [--seconds N] [--corpus-dir DIR] [--fork N] [TARGET...]
#   scripts/fuzz.sh --seed-corpus      rewrite fuzz/corpus/ from the encoders (then commit it)
#   scripts/fuzz.sh --list             the targets
#
# --seconds N      run each target for N seconds (default 30: the CI run)
# --corpus-dir DIR keep the working corpus in DIR/<target> (seeded from fuzz/corpus/<target>
#                  when empty) so that a long campaign grows it across runs; without it each run
#                  works on a scratch copy under the target directory, and fuzz/ is never written
# --fork N         run N libFuzzer processes per target (-fork=N) for long campaigns
#
# cargo-fuzz is installed from crates.io if `cargo fuzz` is missing. The targets need nightly
# compiler flags (sanitizers): a rustup nightly toolchain is used when there is one, otherwise
# the stable one with RUSTC_BOOTSTRAP=1 (P2P_FUZZ_TOOLCHAIN=stable or =nightly forces one).
# They build in release mode with debug assertions and overflow checks, under AddressSanitizer,
# in ${CARGO_TARGET_DIR:-target}/fuzz (apart from the normal build, whose flags differ).
#
# A crash leaves its input under ${CARGO_TARGET_DIR:-target}/fuzz-runs/<target>/artifacts/; the
# script prints the path, the input in base64 and the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(control_message peer_message frames relay_frames relay_hub stun registry demux puncher node_link)
CARGO_FUZZ_VERSION=0.13.2

seconds=30
corpus_dir=
fork=0
mode=run
selected=()
while (($#)); do
    case $1 in
        --seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
        --seconds=*) seconds=${1#*=}; shift ;;
        --corpus-dir) corpus_dir=${2:?--corpus-dir needs a value}; shift 2 ;;
        --corpus-dir=*) corpus_dir=${1#*=}; shift ;;
        --fork) fork=${2:?--fork needs a value}; shift 2 ;;
        --fork=*) fork=${1#*=}; shift ;;
        --seed-corpus) mode=seed; shift ;;
        --list) printf '%s\n' "${TARGETS[@]}"; exit 0 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            if [[ " ${TARGETS[*]} " != *" $1 "* ]]; then
                echo "unknown target $1; targets: ${TARGETS[*]}" >&2
                exit 2
            fi
            selected+=("$1"); shift ;;
    esac
done
if [[ ! $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
    echo "--seconds needs a positive number of seconds" >&2
    exit 2
fi
if ((${#selected[@]} == 0)); then
    selected=("${TARGETS[@]}")
fi

target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)

if [[ $mode == seed ]]; then
    # A normal (not instrumented) build: the generator only calls the encoders.
    rm -rf fuzz/corpus
    cargo run --quiet --manifest-path fuzz/Cargo.toml --target-dir "$target_dir/fuzz-seed" \
        --example seed_corpus -- "$PWD/fuzz/corpus"
    find fuzz/corpus -type f | sort
    exit 0
fi

# cargo-fuzz, and a compiler that accepts its flags.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
cargo_fuzz=(cargo fuzz)
toolchain=${P2P_FUZZ_TOOLCHAIN:-auto}
if [[ $toolchain == auto ]]; then
    toolchain=stable
    if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
        toolchain=nightly
    fi
fi
if [[ $toolchain == nightly ]]; then
    cargo_fuzz=(cargo +nightly fuzz)
    echo "== toolchain: $(rustup run nightly rustc --version)"
else
    # Stable with the nightly gates opened: -Zsanitizer and the sancov passes cargo-fuzz uses.
    export RUSTC_BOOTSTRAP=1
    echo "== toolchain: $(rustc --version) with RUSTC_BOOTSTRAP=1"
fi

# The fuzz crate is outside the workspace, so `cargo fmt --all` does not see it.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

echo "== building ${selected[*]} (release, debug assertions, AddressSanitizer)"
build_start=$SECONDS
for t in "${selected[@]}"; do
    "${cargo_fuzz[@]}" build --fuzz-dir fuzz --release --debug-assertions \
        --target-dir "$target_dir/fuzz" "$t"
done
echo "== built in $((SECONDS - build_start)) s"
bin_dir=$target_dir/fuzz/x86_64-unknown-linux-gnu/release

runs_dir=$target_dir/fuzz-runs
failed=()
summary=()
for t in "${selected[@]}"; do
    run=$runs_dir/$t
    rm -rf "$run"
    mkdir -p "$run/artifacts"
    if [[ -n $corpus_dir ]]; then
        corpus=$corpus_dir/$t
        mkdir -p "$corpus"
        if [[ -z $(ls -A "$corpus") ]]; then
            cp fuzz/corpus/"$t"/* "$corpus"/
        fi
    else
        # A scratch copy: the run adds what it finds there, never to fuzz/corpus.
        corpus=$run/corpus
        mkdir -p "$corpus"
        cp fuzz/corpus/"$t"/* "$corpus"/
    fi
    echo "== $t: ${seconds} s from $(find "$corpus" -type f | wc -l) inputs ($corpus)"
    args=(
        -max_total_time="$seconds"
        # A single input taking this long is a finding (a hang or a quadratic path).
        -timeout=10
        -rss_limit_mb=2048
        -print_final_stats=1
        -artifact_prefix="$run/artifacts/"
    )
    if ((fork > 0)); then
        args+=(-fork="$fork")
    fi
    status=0
    (cd "$run" && "$bin_dir/$t" "${args[@]}" "$corpus") >"$run/log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$run/log" | tail -n1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$run/log" | tail -n1 || true)
    summary+=("$(printf '%-16s %s execs, %s, %s inputs' "$t" "${execs:-?}" "${cov:-cov: ?}" \
        "$(find "$corpus" -type f | wc -l)")")
    crashes=$(find "$run/artifacts" -type f | sort)
    if ((status != 0)) || [[ -n $crashes ]]; then
        failed+=("$t")
        echo "!! $t FAILED (exit $status); log: $run/log"
        # The panic and its message, or the sanitizer's report.
        grep -E -A3 -m 1 'panicked at' "$run/log" || true
        grep -E -m 5 'ERROR: AddressSanitizer|ERROR: libFuzzer|SUMMARY' "$run/log" || true
        for input in $crashes; do
            echo "!! crashing input: $input"
            if (($(stat -c %s "$input") <= 4096)); then
                echo "   base64: $(base64 -w0 "$input")"
            fi
            echo "   replay: $bin_dir/$t $input"
        done
    fi
done

echo "== fuzz summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "!! failed: ${failed[*]}" >&2
    exit 1
fi
