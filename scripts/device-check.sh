#!/usr/bin/env bash
# Device stand-ins for a bundle: run the torch-free runtime where users run it.
#
#   bash scripts/device-check.sh BUNDLE [--py310] [--aarch64] [--wheel FILE] [--keep]
#                                [--also BUNDLE ...] [--no-apps]
#
#   --py310     a venv on Python 3.10 (JetPack 6) with only numpy + the minimum onnxruntime
#               (default when neither --py310 nor --aarch64 is given)
#   --aarch64   a Debian arm64 userland (debootstrap) run under qemu-user-static, with numpy +
#               onnxruntime aarch64 wheels from PyPI (needs root: debootstrap, chroot, unshare)
#   --wheel FILE
#               the runtime wheel to install (default: the one manifest.json's runtime_wheel names),
#               pip-installed (--no-index) into the stand-in's venv, whose numpy and onnxruntime must
#               satisfy its requirements (`pip check`). Nothing is taken from the repository.
#   --keep      keep the temporary work folder (samples, JSON outputs) and print where it is
#   --also BUNDLE
#               another task's bundle from the same run (repeatable): the classifier app runs over
#               BUNDLE and these (it needs two tasks at least; without --also it is skipped)
#   --no-apps   skip the example apps (py310 stand-in only): the anomaly app (examples/anomaly),
#               the classifier (examples/classify) and a serve round trip (`serve` + examples/serve;
#               it pip-installs the wheel's [serve] extra, the HTTP server library, into the venv)
#
# Each stand-in runs, from an empty folder, `python -m projectable_edge_runtime`: info, validate (every
# candidate), score (the bundle's goldens), sample, benchmark, and an import check (nothing outside the
# stdlib, numpy, onnxruntime and the runtime itself may be imported). With both stand-ins, the per-image
# bits/dim of aarch64 are compared with those of x86-64. The py310 stand-in then runs the example
# apps as a user deploys them (their .py files copied beside the bundle, only the wheel installed).
#
# Latency under qemu emulation is NOT device latency; the script says so and never fails on a
# benchmark budget verdict (exit 1 of `benchmark`), only on errors.
#
# Environment (all optional):
#   PE_CACHE_DIR      cache for the venv and the arm64 userland
#                     (default ${XDG_CACHE_HOME:-$HOME/.cache}/projectable-edge)
#   PE_ORT_VERSION    onnxruntime to install (default 1.19.0, the lowest that runs the bundles)
#   PE_NUMPY_SPEC     numpy requirement (default: numpy, i.e. whatever pip pairs with it)
#   PE_PYTHON310      a python3.10 interpreter (default: python3.10 on PATH, then pyenv's)
#   PE_DEBIAN_SUITE   (default bookworm)    PE_DEBIAN_MIRROR (default http://deb.debian.org/debian)
#   PE_CMD_TIMEOUT    seconds per runtime command (default 900)
#
# Exit status: 0 every check passed; 1 a check failed; 2 usage or setup error.
set -uo pipefail

usage() { sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "device-check: error: $*" >&2; exit 2; }
say() { printf '\n== %s\n' "$*"; }

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

BUNDLE="" DO_PY310=0 DO_AARCH64=0 WHEEL="" KEEP=0 DO_APPS=1 ALSO=()
while [ $# -gt 0 ]; do
    case "$1" in
        --py310) DO_PY310=1 ;;
        --aarch64) DO_AARCH64=1 ;;
        --wheel) [ $# -ge 2 ] || die "--wheel needs a .whl file"; WHEEL=$2; shift ;;
        --wheel=*) WHEEL=${1#*=} ;;
        --keep) KEEP=1 ;;
        --no-apps) DO_APPS=0 ;;
        --also) [ $# -ge 2 ] || die "--also needs a bundle folder"; ALSO+=("$2"); shift ;;
        --also=*) ALSO+=("${1#*=}") ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [ -z "$BUNDLE" ] || die "one bundle at a time (got '$BUNDLE' and '$1')"; BUNDLE=$1 ;;
    esac
    shift
done
[ -n "$BUNDLE" ] || { usage >&2; exit 2; }
[ "$DO_PY310$DO_AARCH64" = "00" ] && DO_PY310=1

# Resolve every path before work starts.
[ -d "$BUNDLE" ] || die "bundle folder '$BUNDLE' not found; pass the folder \`projectable-edge generate\` wrote"
[ -f "$BUNDLE/manifest.json" ] || die "'$BUNDLE' has no manifest.json; pass a bundle folder"
BUNDLE=$(cd "$BUNDLE" && pwd -P)
for i in "${!ALSO[@]}"; do
    [ -f "${ALSO[$i]}/manifest.json" ] || die "--also '${ALSO[$i]}' is not a bundle folder (no manifest.json)"
    ALSO[$i]=$(cd "${ALSO[$i]}" && pwd -P)
done
APPS_DIR=$REPO_ROOT/examples
if [ "$DO_APPS" = 1 ]; then
    for f in anomaly/anomaly.py classify/classify.py serve/client.py; do
        [ -f "$APPS_DIR/$f" ] || die "example app '$APPS_DIR/$f' not found; run from a full checkout or pass --no-apps"
    done
fi
if [ -z "$WHEEL" ]; then
    rel=$(python3 -c 'import json, sys; print((json.load(open(sys.argv[1])).get("runtime_wheel") or {})["path"])' \
          "$BUNDLE/manifest.json" 2>/dev/null)
    [ -n "$rel" ] || die "bundle '$BUNDLE' carries no runtime wheel (manifest.json has no runtime_wheel);" \
        "regenerate it with \`projectable-edge generate\`, or pass --wheel"
    WHEEL=$BUNDLE/$rel
fi
[ -f "$WHEEL" ] || die "runtime wheel '$WHEEL' not found"
WHEEL=$(cd "$(dirname "$WHEEL")" && pwd -P)/$(basename "$WHEEL")

CACHE=${PE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/projectable-edge}
ORT_VERSION=${PE_ORT_VERSION:-1.19.0}
NUMPY_SPEC=${PE_NUMPY_SPEC:-numpy}
SUITE=${PE_DEBIAN_SUITE:-bookworm}
MIRROR=${PE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CMD_TIMEOUT=${PE_CMD_TIMEOUT:-900}
mkdir -p "$CACHE" || die "cannot create the cache folder '$CACHE' (set PE_CACHE_DIR)"
CACHE=$(cd "$CACHE" && pwd -P)
NPTAG=$(printf '%s' "$NUMPY_SPEC" | tr -c 'A-Za-z0-9.' '_')

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pe-device-check.XXXXXX") || die "cannot create a temporary folder"
cleanup() {
    if [ "$KEEP" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The checks' Python helper: numpy + onnxruntime + the runtime only.
cat > "$WORK/check_helper.py" <<'PY'
"""device-check helper: validate every candidate on the goldens against the PyTorch reference, sample,
report providers and imports."""
import json
import sys

import numpy as np
import onnxruntime as ort

import projectable_edge_runtime as rt

bundle, out_path = sys.argv[1], sys.argv[2]
out = {"python": sys.version.split()[0], "numpy": np.__version__, "onnxruntime": ort.__version__,
       "providers_available": ort.get_available_providers(), "candidates": {}}
for name in rt.read_manifest(bundle).candidates:
    with rt.load(bundle, candidate=name, backend="onnxruntime", tuned=False) as m:
        out["candidates"][name] = {k: v for k, v in rt.validate(m).items() if k != "execution"}
        m.sample(2, seed=0)
allowed = {"numpy", "onnxruntime", "projectable_edge_runtime"}
mods = {k.split(".")[0] for k in sys.modules} - set(sys.stdlib_module_names) - {
    "__main__", "_distutils_hack", "cython_runtime", "sitecustomize", "usercustomize"}
out["imported_outside_stdlib"] = sorted(k for k in mods if not k.startswith("_cython_"))
out["unexpected_imports"] = sorted(set(out["imported_outside_stdlib"]) - allowed)
out["runtime_file"] = rt.__file__
with open(out_path, "w", encoding="utf-8") as fh:
    json.dump(out, fh, indent=1)
print(f"python {out['python']}, numpy {out['numpy']}, onnxruntime {out['onnxruntime']}; "
      f"providers available: {', '.join(out['providers_available'])}")
for name, r in out["candidates"].items():
    print(f"  {name:20s} {r['bits']:.5f} bits/dim on {', '.join(r['providers'])} (PyTorch reference "
          f"{r['expected_bits']:.5f}, tolerance {r['tolerance']:.4f}: {r['verdict']}), max |image - reference| "
          f"{r['max_abs_diff_per_image']:.5f}")
print("imported outside the stdlib: " + ", ".join(out["imported_outside_stdlib"]))
print(f"runtime imported from {out['runtime_file']}")
if not rt.__file__.startswith(sys.prefix):
    sys.exit("the runtime was NOT imported from the venv's installed wheel")
if out["unexpected_imports"] or not all(r["passed"] for r in out["candidates"].values()):
    sys.exit("UNEXPECTED imports: " + ", ".join(out["unexpected_imports"]) if out["unexpected_imports"]
             else "a candidate failed validation against the PyTorch reference")
PY

# Results: "stage|check|status|note" lines.
RESULTS=()
FAILED=0
record() {  # stage check rc [note]; rc 0 = ok
    local st=ok; [ "$3" = 0 ] || { st=FAIL; FAILED=1; }
    RESULTS+=("$1|$2|$st|${4:-}")
}

# The stand-in the checks run in: a command prefix (none for the py310 venv on this host, in_rootfs
# for the arm64 userland), its venv, its empty work folder and its path to the bundle.
IN=() VENV="" CWD="" BUNDLE_IN=""
stand_in() {  # python ARGS... in the stand-in, from its empty folder (RELATIVE=1: from the bundle's parent)
    local dir=$CWD
    [ "${RELATIVE:-0}" = 1 ] && dir=$(dirname "$BUNDLE_IN")
    "${IN[@]}" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$dir" \
        env PYTHONNOUSERSITE=1 timeout "$CMD_TIMEOUT" "$VENV/bin/python" "$@"
}

setup_venv() {  # STAGE PYTHON: the stand-in's cached venv, with onnxruntime==$ORT_VERSION and $NUMPY_SPEC only
    local t0=$SECONDS
    if "${IN[@]}" test -f "$VENV/.pe-ok"; then say "[$1] reusing $VENV"; return; fi
    say "[$1] creating $VENV (onnxruntime==$ORT_VERSION, $NUMPY_SPEC)"
    "${IN[@]}" /bin/sh -c 'rm -rf "$2" && "$1" -m venv "$2" && "$2/bin/python" -m pip install -q \
        --disable-pip-version-check "onnxruntime==$3" "$4" && "$2/bin/python" -m pip freeze > "$2/.pe-ok"' \
        sh "$2" "$VENV" "$ORT_VERSION" "$NUMPY_SPEC" \
        || die "could not build the $1 venv with onnxruntime==$ORT_VERSION and $NUMPY_SPEC (network? wheel? see above)"
    echo "venv ready in $((SECONDS - t0)) s"
}

# The runtime is the bundle's wheel, pip-installed into the stand-in's venv (numpy + onnxruntime
# already there): --no-index, so its requirements must be met by what is installed; `pip check` says so.
run_checks() {  # STAGE WHEEL (its path in the stand-in) HOST_CWD (the stand-in's CWD seen from this host)
    local stage=$1 b=$BUNDLE_IN wd=$CWD rc c
    say "[$stage] pip install $(basename "$WHEEL") (the bundle's runtime wheel)"
    "${IN[@]}" "$VENV/bin/python" -m pip install -q --no-index --no-deps --force-reinstall "$2" \
        && "${IN[@]}" "$VENV/bin/python" -m pip check
    record "$stage" "install wheel" $? "pip install + pip check"
    cp "$WORK/check_helper.py" "$3/"
    say "[$stage] python -m projectable_edge_runtime info"
    stand_in -m projectable_edge_runtime info "$b"; record "$stage" info $?
    say "[$stage] python -m projectable_edge_runtime info (relative bundle path)"
    RELATIVE=1 stand_in -m projectable_edge_runtime info "$(basename "$b")" >/dev/null
    record "$stage" "info (relative path)" $?
    for c in $(python3 -c 'import json,sys; print(*sorted(json.load(open(sys.argv[1]))["candidates"]))' \
               "$BUNDLE/manifest.json"); do
        say "[$stage] python -m projectable_edge_runtime validate --candidate $c"
        stand_in -m projectable_edge_runtime validate "$b" --candidate "$c"; record "$stage" "validate $c" $?
    done
    say "[$stage] python -m projectable_edge_runtime validate (the target's selected candidate)"
    stand_in -m projectable_edge_runtime validate "$b"; record "$stage" "validate (selected)" $?
    say "[$stage] python -m projectable_edge_runtime score (the goldens as .npy)"
    stand_in -c "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1] + '/goldens.npz')['tokens'])" \
        "$b" "$wd/goldens_tokens.npy" \
        && stand_in -m projectable_edge_runtime score "$b" "$wd/goldens_tokens.npy" | tail -n 3
    record "$stage" score $?
    say "[$stage] python -m projectable_edge_runtime sample"
    stand_in -m projectable_edge_runtime sample "$b" -n 8 --out "$wd/samples.png"; rc=$?
    [ $rc = 0 ] && [ -s "$3/samples.png" ] || rc=1
    record "$stage" sample $rc
    say "[$stage] python -m projectable_edge_runtime benchmark"
    stand_in -m projectable_edge_runtime benchmark "$b" "${BENCH_ARGS[@]}" 2>&1 | tee "$WORK/$stage-benchmark.txt"
    rc=${PIPESTATUS[0]}
    [ "$stage" = aarch64 ] \
        && echo "^^ EMULATED under qemu: these latencies and the budget verdict are NOT device numbers"
    # exit 1 is the budget verdict only when the runtime printed one (a crash also exits 1)
    if [ $rc = 1 ] && grep -q '^verdict: FAIL' "$WORK/$stage-benchmark.txt"; then
        record "$stage" benchmark 0 "budget verdict FAIL (not counted: not a device measurement)"
    else
        record "$stage" benchmark $rc "$BENCH_NOTE"
    fi
    say "[$stage] every candidate on the goldens + import check"
    stand_in "$wd/check_helper.py" "$b" "$wd/scores.json"; record "$stage" "scores + imports" $?
}

# ---------------------------------------------------------------------------------------------
# Python 3.10 stand-in
# ---------------------------------------------------------------------------------------------
find_python310() {  # the first candidate that really is Python 3.10 (pyenv shims may not be)
    local root=${PYENV_ROOT:-$HOME/.pyenv} c
    for c in ${PE_PYTHON310:+"$PE_PYTHON310"} "$(command -v python3.10 2>/dev/null)" \
             $(ls -d "$root"/versions/3.10*/bin/python3.10 2>/dev/null | sort -rV); do
        [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 \
            && { echo "$c"; return 0; }
    done
    return 1
}

stage_py310() {
    local py
    py=$(find_python310) \
        || die "no Python 3.10 found; install one (e.g. \`pyenv install 3.10\`) or set PE_PYTHON310"
    IN=() CWD=$WORK/py310/cwd BUNDLE_IN=$BUNDLE
    VENV=$CACHE/py310-$("$py" -c 'import platform; print(platform.python_version())')-ort$ORT_VERSION-$NPTAG
    PY310_VENV=$VENV
    setup_venv py310 "$py"
    mkdir -p "$CWD"
    BENCH_ARGS=(--runs 50 --warmup 5)
    BENCH_NOTE="host latency (x86-64), not device latency"
    run_checks py310 "$WHEEL" "$CWD"
    [ "$DO_APPS" = 1 ] && run_apps py310
}

# ---------------------------------------------------------------------------------------------
# The example apps in the py310 stand-in: copied as a user deploys them, run against the installed wheel
# ---------------------------------------------------------------------------------------------
anomaly() {  # N CONFIG CALIBRATE_ARGS...: calibrate, then score the goldens; 0 when all N got a verdict
    local n=$1 cfg=$2 out=${2%.json}.out lines
    shift 2
    stand_in "$CWD/apps/anomaly.py" calibrate "$BUNDLE" --config "$cfg" "$@" \
        && stand_in "$CWD/apps/anomaly.py" score --config "$cfg" "$CWD/goldens_tokens.npy" > "$out" || return 1
    lines=$(grep -c '"verdict"' "$out")
    head -n 2 "$out"
    echo "$lines JSON lines for $n goldens; flagged: $(grep -c '"anomaly"' "$out")"
    [ "$lines" = "$n" ]
}

run_apps() {  # STAGE (its CWD holds goldens_tokens.npy from run_checks)
    local stage=$1 wd=$CWD n lines rc port pid i
    mkdir -p "$wd/apps"
    cp "$APPS_DIR/anomaly/anomaly.py" "$APPS_DIR/classify/classify.py" "$APPS_DIR/serve/client.py" "$wd/apps/"
    n=$(stand_in -c "import numpy as np, sys; print(len(np.load(sys.argv[1])))" "$wd/goldens_tokens.npy")

    say "[$stage] anomaly app: calibrate on the goldens, score them from a file and from stdin"
    anomaly "$n" "$wd/anomaly.json" --false-alarm-rate 0.1 \
        && stand_in "$wd/apps/anomaly.py" score --config "$wd/anomaly.json" - < "$wd/goldens_tokens.npy" \
            > "$wd/anomaly-stdin.out" \
        && [ "$(grep -c '"verdict"' "$wd/anomaly-stdin.out")" = "$n" ]
    record "$stage" "app: anomaly" $? "calibrate + score (file, stdin)"
    if [ ${#ALSO[@]} -gt 0 ]; then
        say "[$stage] anomaly app with --reference (the --also bundles)"
        anomaly "$n" "$wd/anomaly-ref.json" --reference "${ALSO[@]}"
        record "$stage" "app: anomaly --ref" $? "${#ALSO[@]} reference bundles"

        say "[$stage] classifier app over $((1 + ${#ALSO[@]})) task bundles (the goldens of $(basename "$BUNDLE"))"
        stand_in "$wd/apps/classify.py" "$BUNDLE" "${ALSO[@]}" --images "$wd/goldens_tokens.npy" > "$wd/classify.out"
        rc=$?
        lines=$(grep -c '"task"' "$wd/classify.out" 2>/dev/null)
        head -n 1 "$wd/classify.out" 2>/dev/null | cut -c 1-200
        stand_in -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
task = json.load(open(sys.argv[2] + "/manifest.json"))["task"]["name"]
ok = sum(r["task"] == task for r in rows)
print(f"{ok}/{len(rows)} goldens of task {task} classified as {task}")' "$wd/classify.out" "$BUNDLE"
        [ "$rc" = 0 ] && [ "$lines" = "$n" ] || rc=1
        record "$stage" "app: classify" $rc "$((1 + ${#ALSO[@]})) bundles"
    else
        echo "classifier app skipped: it needs bundles of two tasks at least (pass --also BUNDLE)"
        RESULTS+=("$stage|app: classify|skip|needs --also BUNDLE")
    fi

    say "[$stage] serve: pip install '$(basename "$WHEEL")[serve]' (from the index unless already there)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL[serve]" \
        && "$VENV/bin/python" -m pip check && "$VENV/bin/python" -m pip list 2>/dev/null | grep -i '^waitress '
    record "$stage" "install wheel[serve]" $? "pip install '...whl[serve]' + pip check"
    say "[$stage] serve: python -m projectable_edge_runtime serve --port 0 --json, then a client round trip"
    (cd "$wd" && exec "$VENV/bin/python" -m projectable_edge_runtime serve "$BUNDLE" --port 0 --json \
        > "$wd/serve.out" 2> "$wd/serve.err") &
    pid=$!
    port=""
    for i in $(seq 1 300); do
        port=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$wd/serve.out" 2>/dev/null | head -n 1 | sed 's/.*://')
        [ -n "$port" ] && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.2
    done
    if [ -n "$port" ]; then
        head -n 1 "$wd/serve.out"
        stand_in "$wd/apps/client.py" "http://127.0.0.1:$port" roundtrip "$wd/goldens_tokens.npy"; rc=$?
        kill -TERM $pid 2>/dev/null; wait $pid; [ $? = 0 ] || rc=1
        tail -n +2 "$wd/serve.out" | cut -c 1-200
        # --json: stdout is JSON Lines, a "serving" event then a "stopped" one
        stand_in -c 'import json, sys; ev = [json.loads(l)["event"] for l in open(sys.argv[1])]
sys.exit(None if ev == ["serving", "stopped"] else f"serve --json events: {ev}")' "$wd/serve.out" || rc=1
    else
        echo "the server did not start:"; cat "$wd/serve.out" "$wd/serve.err"; kill $pid 2>/dev/null; rc=1
    fi
    record "$stage" "app: serve round trip" $rc "every route; bad input gets 4xx; SIGTERM exits 0"
}

# ---------------------------------------------------------------------------------------------
# aarch64 stand-in: Debian arm64 userland under qemu-user-static
# ---------------------------------------------------------------------------------------------
ROOTFS=""
CHROOT_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
            PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1)
for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL; do
    [ -n "${!var:-}" ] && CHROOT_ENV+=("$var=${!var}")
done

in_rootfs() {  # run a command inside the arm64 userland; /proc, /sys, /dev mounted in a private namespace
    unshare --mount --propagation private -- sh -c '
        r=$1; shift
        mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" \
            || { echo "device-check: cannot mount /proc, /sys, /dev in $r" >&2; exit 97; }
        exec chroot "$r" /usr/bin/env -i "$@"' sh "$ROOTFS" "${CHROOT_ENV[@]}" "$@"
}

ensure_binfmt() {
    command -v qemu-aarch64-static >/dev/null \
        || die "qemu-aarch64-static not found; install Debian's qemu-user-static" \
               "(apt-get install qemu-user-static binfmt-support)"
    local f=/proc/sys/fs/binfmt_misc/qemu-aarch64
    if [ ! -e "$f" ]; then
        [ -e /proc/sys/fs/binfmt_misc/register ] \
            || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
        command -v update-binfmts >/dev/null && update-binfmts --enable qemu-aarch64 2>/dev/null || true
    fi
    [ -e "$f" ] && head -n 1 "$f" | grep -q enabled \
        || die "aarch64 binaries cannot run here: no binfmt_misc entry for qemu-aarch64; run \`mount -t binfmt_misc" \
               "binfmt_misc /proc/sys/fs/binfmt_misc && update-binfmts --enable qemu-aarch64\` as root"
}

build_rootfs() {
    local partial=$1.partial t0=$SECONDS keyring=()
    command -v debootstrap >/dev/null || die "debootstrap not found; apt-get install debootstrap"
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
        && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    say "[aarch64] building a Debian $SUITE arm64 userland in $1 (first time only; tens of minutes)"
    rm -rf "$partial"
    debootstrap --arch=arm64 --foreign --variant=minbase "${keyring[@]}" \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$partial" "$MIRROR" \
        || die "debootstrap (first stage) failed; see above"
    echo "first stage done in $((SECONDS - t0)) s"
    cp /usr/bin/qemu-aarch64-static "$partial/usr/bin/"  # for binfmt entries without the F flag
    ROOTFS=$partial
    in_rootfs /debootstrap/debootstrap --second-stage || die "debootstrap (second stage, emulated) failed; see above"
    echo "second stage done; userland built in $((SECONDS - t0)) s"
    mv "$partial" "$1"
}

stage_aarch64() {
    local t0=$SECONDS rootfs=$CACHE/aarch64-$SUITE/rootfs
    local ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    [ "$(id -u)" = 0 ] || die "--aarch64 needs root (debootstrap, chroot, mounts); rerun with sudo"
    command -v unshare >/dev/null || die "unshare (util-linux) not found"
    ensure_binfmt
    [ -x "$rootfs/usr/bin/python3" ] || build_rootfs "$rootfs"
    ROOTFS=$rootfs
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
    # pip inside trusts what the host's pip trusts (a proxy's CA lives only in the host's bundle)
    [ -f "$ca" ] && cp -L "$ca" "$ROOTFS/etc/pe-host-ca.crt" && CHROOT_ENV+=(PIP_CERT=/etc/pe-host-ca.crt)
    IN=(in_rootfs) VENV=/opt/pe/venv-ort$ORT_VERSION-$NPTAG CWD=/pe-work/cwd BUNDLE_IN=/pe-work/bundle
    setup_venv aarch64 python3
    echo "userland ready after $((SECONDS - t0)) s; inside: $(in_rootfs uname -m), $(in_rootfs "$VENV/bin/python" -V)"
    # A fresh work folder inside the userland: the runtime and a copy of the bundle.
    rm -rf "$ROOTFS/pe-work"
    mkdir -p "$ROOTFS/pe-work/cwd"
    cp -a "$BUNDLE" "$ROOTFS/pe-work/bundle"
    cp "$WHEEL" "$ROOTFS/pe-work/"
    echo "NOTE: under qemu emulation every latency below is the emulator's, NOT device latency."
    BENCH_ARGS=(--runs 10 --warmup 2 --sample-runs 1)
    BENCH_NOTE="EMULATED: latency meaningless (not device latency)"
    run_checks aarch64 "/pe-work/$(basename "$WHEEL")" "$ROOTFS/pe-work/cwd"
    mkdir -p "$WORK/aarch64"
    cp "$ROOTFS/pe-work/cwd/scores.json" "$ROOTFS/pe-work/cwd/samples.png" "$WORK/aarch64/" 2>/dev/null
    [ "$KEEP" = 1 ] || rm -rf "$ROOTFS/pe-work"
    echo "aarch64 stage took $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------------------------
# Bundle readable by another user (an app's service account)
# ---------------------------------------------------------------------------------------------
check_permissions() {
    say "bundle readable by other users (folders 0755, files 0644)"
    local bad
    bad=$(find "$BUNDLE" \( -type d ! -perm -0005 \) -o \( -type f ! -perm -0004 \) 2>/dev/null)
    if [ -n "$bad" ]; then
        echo "not readable by other users:"; echo "$bad" | sed 's/^/  /'
        record bundle "world-readable" 1 "$(echo "$bad" | wc -l | tr -d ' ') paths not readable by others"
    else
        echo "ok"; record bundle "world-readable" 0
    fi
}

echo "device-check: bundle $BUNDLE"
echo "  runtime wheel $WHEEL; onnxruntime==$ORT_VERSION, $NUMPY_SPEC; cache $CACHE"
T_ALL=$SECONDS
check_permissions
[ "$DO_PY310" = 1 ] && stage_py310
[ "$DO_AARCH64" = 1 ] && stage_aarch64

if [ -f "$WORK/py310/cwd/scores.json" ] && [ -f "$WORK/aarch64/scores.json" ]; then
    say "aarch64 vs x86-64 (py310): per-image bits/dim on the same goldens"
    "$PY310_VENV/bin/python" - "$WORK/py310/cwd/scores.json" "$WORK/aarch64/scores.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
worst = 0.0
for c in sorted(set(a["candidates"]) & set(b["candidates"])):
    x, y = a["candidates"][c], b["candidates"][c]
    d = max(abs(p - q) for p, q in zip(x["bits_per_image"], y["bits_per_image"]))
    worst = max(worst, d)
    print(f"  {c:20s} max per-image |diff| {d:.2e}, mean |diff| {abs(x['bits'] - y['bits']):.2e} bits/dim")
print(f"  largest per-image difference: {worst:.2e} bits/dim")
PY
fi

say "summary ($((SECONDS - T_ALL)) s)"
for r in "${RESULTS[@]}"; do
    IFS='|' read -r stage check st note <<<"$r"
    printf '  %-8s %-28s %-4s %s\n' "$stage" "$check" "$st" "$note"
done
[ "$DO_AARCH64" = 1 ] && echo "  (aarch64 ran under qemu emulation: its latencies are not device latencies)"
if [ "$FAILED" = 0 ]; then echo "device-check: PASS"; exit 0; fi
echo "device-check: FAIL"
exit 1
