#!/usr/bin/env bash
# Device stand-ins for a bundle: run the torch-free runtime where users run it.
#
#   bash scripts/device-check.sh BUNDLE [--py310] [--aarch64] [--wheel FILE] [--keep] [--also BUNDLE]... [--no-apps]
#
#   --py310        a Python 3.10 venv (JetPack 6) with only numpy + the minimum onnxruntime (the default)
#   --aarch64      a Debian arm64 userland (debootstrap) under qemu-user-static, with numpy + onnxruntime
#                  aarch64 wheels from PyPI (needs root: debootstrap, chroot, unshare)
#   --wheel FILE   the runtime wheel (default: the one manifest.json's runtime_wheel names), pip-installed
#                  --no-index into the stand-in's venv: its numpy and onnxruntime must satisfy it (`pip check`)
#   --keep         keep the temporary work folder (samples, JSON outputs) and print where it is
#   --also BUNDLE  another task's bundle from the same run (repeatable): the classifier app runs over BUNDLE
#                  and these (skipped without --also), the anomaly app also with them as --reference
#   --no-apps      skip the example apps (py310 stand-in only): examples/anomaly, examples/classify and a
#                  serve round trip (`serve` + examples/serve; pip-installs the wheel's [serve] extra)
#
# Each stand-in runs, from an empty folder, `python -m projectable_edge_runtime` info, validate, score,
# sample, benchmark, every candidate on the goldens, and an import check (nothing outside the stdlib, numpy,
# onnxruntime and the runtime); with both, their per-image bits/dim are compared. Under qemu, latency is the
# emulator's: a benchmark budget verdict (exit 1 of `benchmark`) never fails the check, only errors do.
#
# Environment (all optional):
#   PE_CACHE_DIR      cache for the venvs and the arm64 userland (default ${XDG_CACHE_HOME:-~/.cache}/projectable-edge)
#   PE_ORT_VERSION    onnxruntime to install (default 1.19.0, the lowest that runs the bundles)
#   PE_NUMPY_SPEC     numpy requirement (default: numpy, i.e. whatever pip pairs with it)
#   PE_PYTHON310      a python3.10 interpreter (default: python3.10 on PATH, then pyenv's)
#   PE_DEBIAN_SUITE   (default bookworm)    PE_DEBIAN_MIRROR (default http://deb.debian.org/debian)
#   PE_CMD_TIMEOUT    seconds per runtime command (default 900)
#
# Exit status: 0 every check passed; 1 a check failed; 2 usage or setup error.
set -uo pipefail

usage() { sed -n '2,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "device-check: error: $*" >&2; exit 2; }
say() { printf '\n== %s\n' "$*"; }

BUNDLE="" DO_PY310=0 DO_AARCH64=0 WHEEL="" KEEP=0 DO_APPS=1 ALSO=()
while [ $# -gt 0 ]; do
    case "$1" in --wheel=*|--also=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac  # --OPTION=VALUE as two words
    case "$1" in
        --py310) DO_PY310=1 ;;
        --aarch64) DO_AARCH64=1 ;;
        --wheel) [ $# -ge 2 ] || die "--wheel needs a .whl file"; WHEEL=$2; shift ;;
        --keep) KEEP=1 ;;
        --no-apps) DO_APPS=0 ;;
        --also) [ $# -ge 2 ] || die "--also needs a bundle folder"; ALSO+=("$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [ -z "$BUNDLE" ] || die "one bundle at a time (got '$BUNDLE' and '$1')"; BUNDLE=$1 ;;
    esac
    shift
done
[ -n "$BUNDLE" ] || { usage >&2; exit 2; }
[ "$DO_PY310$DO_AARCH64" = "00" ] && DO_PY310=1

# Resolve every path before work starts.
[ -f "$BUNDLE/manifest.json" ] \
    || die "'$BUNDLE' is not a bundle folder (no manifest.json); pass the folder \`projectable-edge generate\` wrote"
BUNDLE=$(cd "$BUNDLE" && pwd -P)
for i in "${!ALSO[@]}"; do
    [ -f "${ALSO[$i]}/manifest.json" ] || die "--also '${ALSO[$i]}' is not a bundle folder (no manifest.json)"
    ALSO[$i]=$(cd "${ALSO[$i]}" && pwd -P)
done
APPS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/examples
[ "$DO_APPS" = 0 ] || ls "$APPS_DIR"/{anomaly/anomaly,classify/classify,serve/client}.py >/dev/null \
    || die "the example apps above are missing from '$APPS_DIR'; run from a full checkout or pass --no-apps"
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
CACHE=$(mkdir -p "$CACHE" && cd "$CACHE" && pwd -P) || die "cannot create the cache folder '$CACHE' (set PE_CACHE_DIR)"
NPTAG=$(printf '%s' "$NUMPY_SPEC" | tr -c 'A-Za-z0-9.' '_')
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pe-device-check.XXXXXX") || die "cannot create a temporary folder"
trap '[ "$KEEP" = 1 ] && echo "work folder kept: $WORK" || rm -rf "$WORK"' EXIT

# BUNDLE SCORES_OUT [X86_SCORES]: every candidate validated and sampled in one process, so that the import
# check sees every module the runtime loads; with X86_SCORES, the per-image bits/dim compared with those.
read -r -d '' HELPER <<'PY'
import json, sys
import numpy as np
import onnxruntime as ort
import projectable_edge_runtime as rt
bundle, out_path, *x86 = sys.argv[1:]
print(f"python {sys.version.split()[0]}, numpy {np.__version__}, onnxruntime {ort.__version__}; "
      f"providers available: {', '.join(ort.get_available_providers())}")
scores = {}
for name in rt.read_manifest(bundle).candidates:
    with rt.load(bundle, candidate=name, backend="onnxruntime", tuned=False) as m:
        r = scores[name] = rt.validate(m)
        m.sample(2, seed=0)
    print(f"  {name:20s} {r['bits']:.5f} bits/dim on {', '.join(r['providers'])} (PyTorch reference "
          f"{r['expected_bits']:.5f}, tolerance {r['tolerance']:.4f}: {r['verdict']}), max |image - reference| "
          f"{r['max_abs_diff_per_image']:.5f}")
with open(out_path, "w", encoding="utf-8") as fh:
    json.dump(scores, fh)
mods = {k.split(".")[0] for k in sys.modules} - set(sys.stdlib_module_names) - {
    "__main__", "_distutils_hack", "cython_runtime", "sitecustomize", "usercustomize"}
imported = sorted(k for k in mods if not k.startswith("_cython_"))
unexpected = sorted(set(imported) - {"numpy", "onnxruntime", "projectable_edge_runtime"})
print("imported outside the stdlib: " + ", ".join(imported))
if not rt.__file__.startswith(sys.prefix):
    sys.exit(f"the runtime was NOT imported from the venv's installed wheel but from {rt.__file__}")
if x86:
    print("aarch64 vs x86-64 (py310): per-image bits/dim on the same goldens")
    ref, worst = json.load(open(x86[0])), 0.0
    for c in sorted(set(ref) & set(scores)):
        x, y = ref[c], scores[c]
        d = max(abs(p - q) for p, q in zip(x["bits_per_image"], y["bits_per_image"]))
        worst = max(worst, d)
        print(f"  {c:20s} max per-image |diff| {d:.2e}, mean |diff| {abs(x['bits'] - y['bits']):.2e} bits/dim")
    print(f"  largest per-image difference: {worst:.2e} bits/dim")
if unexpected:
    sys.exit("UNEXPECTED imports: " + ", ".join(unexpected))
if not all(r["passed"] for r in scores.values()):
    sys.exit("a candidate failed validation against the PyTorch reference")
PY

RESULTS=() FAILED=0  # the summary's lines; 1 once a check failed
record() {  # STAGE CHECK RC [NOTE]: rc 0 = ok, "skip" = skipped, anything else = FAIL
    local st=ok
    case $3 in 0) ;; skip) st=skip ;; *) st=FAIL FAILED=1 ;; esac
    RESULTS+=("$(printf '  %-8s %-28s %-4s %s' "$1" "$2" "$st" "${4:-}")")
}

# A stand-in: its command prefix (IN: none for py310, in_rootfs for arm64), VENV, empty CWD and BUNDLE_IN.
stand_in() {  # python ARGS... in the stand-in, from its empty folder (CWD=DIR stand_in ...: from DIR)
    "${IN[@]}" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$CWD" \
        env PYTHONNOUSERSITE=1 timeout "${PE_CMD_TIMEOUT:-900}" "$VENV/bin/python" "$@"
}

setup_venv() {  # STAGE PYTHON: the stand-in's cached venv, with onnxruntime==$ORT_VERSION and $NUMPY_SPEC only
    if "${IN[@]}" test -f "$VENV/.pe-ok"; then say "[$1] reusing $VENV"; return; fi
    say "[$1] creating $VENV (onnxruntime==$ORT_VERSION, $NUMPY_SPEC)"
    "${IN[@]}" /bin/sh -c 'rm -rf "$2" && "$1" -m venv "$2" && "$2/bin/python" -m pip install -q \
        --disable-pip-version-check "onnxruntime==$3" "$4" && "$2/bin/python" -m pip freeze > "$2/.pe-ok"' \
        sh "$2" "$VENV" "$ORT_VERSION" "$NUMPY_SPEC" \
        || die "could not build the $1 venv with onnxruntime==$ORT_VERSION and $NUMPY_SPEC (network? wheel? see above)"
}

# The bundle's wheel, installed --no-index: numpy and onnxruntime, already there, must meet its requirements.
run_checks() {  # STAGE WHEEL HOST_CWD [X86_SCORES]: paths in the stand-in, but HOST_CWD (its CWD seen from here)
    local stage=$1 b=$BUNDLE_IN wd=$CWD rc bench=(--runs 50 --warmup 5) note="host latency (x86-64), not device latency"
    [ "$stage" = aarch64 ] \
        && bench=(--runs 10 --warmup 2 --sample-runs 1) note="EMULATED: latency meaningless (not device latency)"
    say "[$stage] pip install $(basename "$WHEEL") (the bundle's runtime wheel)"
    "${IN[@]}" "$VENV/bin/python" -m pip install -q --no-index --no-deps --force-reinstall "$2" \
        && "${IN[@]}" "$VENV/bin/python" -m pip check
    record "$stage" "install wheel" $? "pip install + pip check"
    say "[$stage] python -m projectable_edge_runtime info (relative bundle path)"
    CWD=$(dirname "$b") stand_in -m projectable_edge_runtime info "$(basename "$b")"
    record "$stage" "info (relative path)" $?
    stand_in -m projectable_edge_runtime info "$b" > /dev/null
    record "$stage" "info (absolute path)" $?
    say "[$stage] python -m projectable_edge_runtime validate (the selected candidate, then each by name)"
    stand_in -m projectable_edge_runtime validate "$b"
    record "$stage" "validate (selected)" $?
    for c in $(python3 -c 'import json, sys; print(*json.load(open(sys.argv[1]))["candidates"])' "$BUNDLE/manifest.json"); do
        stand_in -m projectable_edge_runtime validate "$b" --candidate "$c" > /dev/null
        record "$stage" "validate $c" $?
    done
    say "[$stage] python -m projectable_edge_runtime score (the goldens as .npy)"
    stand_in -c "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1] + '/goldens.npz')['tokens'])" \
        "$b" "$wd/goldens_tokens.npy" \
        && stand_in -m projectable_edge_runtime score "$b" "$wd/goldens_tokens.npy" | tail -n 3
    record "$stage" score $?
    say "[$stage] python -m projectable_edge_runtime sample"
    stand_in -m projectable_edge_runtime sample "$b" -n 8 --out "$wd/samples.png" && [ -s "$3/samples.png" ]
    record "$stage" sample $?
    say "[$stage] python -m projectable_edge_runtime benchmark"
    stand_in -m projectable_edge_runtime benchmark "$b" "${bench[@]}" 2>&1 | tee "$WORK/$stage-benchmark.txt"
    rc=${PIPESTATUS[0]}
    # exit 1 is the budget verdict only when the runtime printed one (a crash also exits 1)
    if [ "$rc" = 1 ] && grep -q '^verdict: FAIL' "$WORK/$stage-benchmark.txt"; then
        rc=0 note="budget verdict FAIL (not counted: not a device measurement)"
    fi
    record "$stage" benchmark "$rc" "$note"
    say "[$stage] every candidate on the goldens + import check"
    stand_in -c "$HELPER" "$b" "$wd/scores.json" "${@:4}"
    record "$stage" "scores + imports" $?
}

stage_py310() {
    local py
    for py in ${PE_PYTHON310:+"$PE_PYTHON310"} python3.10 \
              $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10 2>/dev/null | sort -rV); do
        "$py" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && break
        py=""  # not Python 3.10 (pyenv shims may not be), or not there
    done
    [ -n "$py" ] || die "no Python 3.10 found; install one (e.g. \`pyenv install 3.10\`) or set PE_PYTHON310"
    IN=() CWD=$WORK/py310/cwd BUNDLE_IN=$BUNDLE
    VENV=$CACHE/py310-$("$py" -c 'import platform; print(platform.python_version())')-ort$ORT_VERSION-$NPTAG
    setup_venv py310 "$py"
    mkdir -p "$CWD"
    run_checks py310 "$WHEEL" "$CWD"
    [ "$DO_APPS" = 1 ] && run_apps py310
}

anomaly() {  # N CONFIG CALIBRATE_ARGS...: calibrate, score the goldens from a file and stdin; 0 when 2N verdicts
    local n=$1 cfg=$2 out=${2%.json}.out lines
    shift 2
    stand_in "$CWD/apps/anomaly.py" calibrate "$BUNDLE" --config "$cfg" "$@" \
        && stand_in "$CWD/apps/anomaly.py" score --config "$cfg" "$CWD/goldens_tokens.npy" - \
            < "$CWD/goldens_tokens.npy" > "$out" || return 1
    lines=$(grep -c '"verdict"' "$out")
    head -n 2 "$out"
    echo "$lines JSON lines for $n goldens (file + stdin); flagged: $(grep -c '"anomaly"' "$out")"
    case $n in ''|*[!0-9]*) return 1 ;; esac
    [ "$lines" = $((2 * n)) ]
}

run_apps() {  # STAGE: the example apps as a user deploys them (copied; only the wheel installed) in py310's CWD
    local stage=$1 wd=$CWD n rc port pid
    mkdir -p "$wd/apps"
    cp "$APPS_DIR"/{anomaly/anomaly,classify/classify,serve/client}.py "$wd/apps/"
    n=$(stand_in -c "import numpy as np, sys; print(len(np.load(sys.argv[1])))" "$wd/goldens_tokens.npy")
    say "[$stage] anomaly app: calibrate on the goldens, score them from a file and from stdin"
    anomaly "$n" "$wd/anomaly.json" --false-alarm-rate 0.1
    record "$stage" "app: anomaly" $? "calibrate + score (file, stdin)"
    if [ ${#ALSO[@]} -gt 0 ]; then
        say "[$stage] anomaly app with --reference (the --also bundles)"
        anomaly "$n" "$wd/anomaly-ref.json" --reference "${ALSO[@]}"
        record "$stage" "app: anomaly --ref" $? "${#ALSO[@]} reference bundles"
        say "[$stage] classifier app over $((1 + ${#ALSO[@]})) task bundles (the goldens of $(basename "$BUNDLE"))"
        stand_in "$wd/apps/classify.py" "$BUNDLE" "${ALSO[@]}" --images "$wd/goldens_tokens.npy" > "$wd/classify.out" \
            && head -n 1 "$wd/classify.out" | cut -c 1-200 \
            && stand_in -c 'import json, sys; task = json.load(open(sys.argv[2] + "/manifest.json"))["task"]["name"]
rows = [json.loads(line)["task"] for line in open(sys.argv[1])]
print(f"{rows.count(task)}/{len(rows)} goldens of task {task} classified as {task}")
sys.exit(len(rows) != int(sys.argv[3]))' "$wd/classify.out" "$BUNDLE" "$n"
        record "$stage" "app: classify" $? "$((1 + ${#ALSO[@]})) bundles"
    else
        record "$stage" "app: classify" skip "needs bundles of two tasks at least: pass --also BUNDLE"
    fi

    say "[$stage] serve: pip install '$(basename "$WHEEL")[serve]' (from the index unless already there)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${WHEEL}[serve]" \
        && "$VENV/bin/python" -m pip check && "$VENV/bin/python" -m pip list 2>/dev/null | grep -i '^waitress '
    record "$stage" "install wheel[serve]" $? "pip install '...whl[serve]' + pip check"
    say "[$stage] serve: python -m projectable_edge_runtime serve --port 0 --json, then a client round trip"
    (cd "$wd" && exec "$VENV/bin/python" -m projectable_edge_runtime serve "$BUNDLE" --port 0 --json \
        > "$wd/serve.out" 2> "$wd/serve.err") &
    pid=$!
    for _ in $(seq 1 300); do  # up to a minute for its "serving" line, unless it exits
        port=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$wd/serve.out" 2>/dev/null | head -n 1 | sed 's/.*://')
        [ -n "$port" ] || ! kill -0 $pid 2>/dev/null && break
        sleep 0.2
    done
    [ -n "$port" ] && stand_in "$wd/apps/client.py" "http://127.0.0.1:$port" roundtrip "$wd/goldens_tokens.npy"
    rc=$?
    kill -TERM $pid 2>/dev/null
    wait $pid || rc=1
    cut -c 1-200 "$wd/serve.out"
    [ -n "$port" ] || printf 'the server did not start:\n%s\n' "$(cat "$wd/serve.err")"
    stand_in -c 'import json, sys; ev = [json.loads(l)["event"] for l in open(sys.argv[1])]
sys.exit(None if ev == ["serving", "stopped"] else f"serve --json events: {ev}")' "$wd/serve.out" || rc=1
    record "$stage" "app: serve round trip" $rc "every route; bad input gets 4xx; SIGTERM exits 0"
}

# The aarch64 stand-in: a Debian arm64 userland under qemu-user-static, entered with this environment only.
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

ensure_binfmt() {  # qemu-aarch64 registered with binfmt_misc (registered here when it is not)
    local f=/proc/sys/fs/binfmt_misc/qemu-aarch64
    command -v qemu-aarch64-static >/dev/null \
        || die "qemu-aarch64-static not found; apt-get install qemu-user-static binfmt-support"
    if [ ! -e "$f" ]; then
        [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        update-binfmts --enable qemu-aarch64
    fi 2>/dev/null
    head -n 1 "$f" 2>/dev/null | grep -q enabled \
        || die "aarch64 binaries cannot run here: no binfmt_misc entry for qemu-aarch64; run \`mount -t binfmt_misc" \
               "binfmt_misc /proc/sys/fs/binfmt_misc && update-binfmts --enable qemu-aarch64\` as root"
}

build_rootfs() {
    local partial=$1.partial
    command -v debootstrap >/dev/null || die "debootstrap not found; apt-get install debootstrap"
    say "[aarch64] building a Debian $SUITE arm64 userland in $1 (first time only; tens of minutes)"
    rm -rf "$partial"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$partial" "${PE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        || die "debootstrap (first stage) failed; see above"
    cp /usr/bin/qemu-aarch64-static "$partial/usr/bin/"  # for binfmt entries without the F flag
    ROOTFS=$partial
    in_rootfs /debootstrap/debootstrap --second-stage || die "debootstrap (second stage, emulated) failed; see above"
    mv "$partial" "$1"
}

stage_aarch64() {
    local t0=$SECONDS rootfs=$CACHE/aarch64-$SUITE/rootfs x86=()
    local ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    [ "$(id -u)" = 0 ] || die "--aarch64 needs root (debootstrap, chroot, mounts); rerun with sudo"
    command -v unshare >/dev/null || die "unshare (util-linux) not found"
    ensure_binfmt
    [ -x "$rootfs/usr/bin/python3" ] || build_rootfs "$rootfs"
    ROOTFS=$rootfs
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null
    # pip inside trusts what the host's pip trusts (a proxy's CA lives only in the host's bundle)
    [ -f "$ca" ] && cp -L "$ca" "$ROOTFS/etc/pe-host-ca.crt" && CHROOT_ENV+=(PIP_CERT=/etc/pe-host-ca.crt)
    IN=(in_rootfs) VENV=/opt/pe/venv-ort$ORT_VERSION-$NPTAG CWD=/pe-work/cwd BUNDLE_IN=/pe-work/bundle
    setup_venv aarch64 python3
    echo "userland ready after $((SECONDS - t0)) s; inside: $(in_rootfs uname -m), $(in_rootfs "$VENV/bin/python" -V)"
    rm -rf "$ROOTFS/pe-work"
    mkdir -p "$ROOTFS/pe-work/cwd"
    cp -a "$BUNDLE" "$ROOTFS/pe-work/bundle"
    cp "$WHEEL" "$ROOTFS/pe-work/"
    cp "$WORK/py310/cwd/scores.json" "$ROOTFS/pe-work/x86-64.json" 2>/dev/null && x86=(/pe-work/x86-64.json)
    run_checks aarch64 "/pe-work/$(basename "$WHEEL")" "$ROOTFS/pe-work/cwd" "${x86[@]}"
    [ "$KEEP" = 1 ] && echo "aarch64 work folder kept: $ROOTFS/pe-work" || rm -rf "$ROOTFS/pe-work"
}

echo "device-check: bundle $BUNDLE"
echo "  runtime wheel $WHEEL; onnxruntime==$ORT_VERSION, $NUMPY_SPEC; cache $CACHE"
say "bundle readable by other users, as an app's service account (folders 0755, files 0644)"
bad=$(find "$BUNDLE" \( -type d ! -perm -0005 \) -o \( -type f ! -perm -0004 \) 2>/dev/null | sed 's/^/  /')
[ -z "$bad" ] && echo ok || printf 'not readable by other users:\n%s\n' "$bad"
[ -z "$bad" ]
record bundle "world-readable" $? "${bad:+$(grep -c . <<<"$bad") paths not readable by others}"
[ "$DO_PY310" = 1 ] && stage_py310
[ "$DO_AARCH64" = 1 ] && stage_aarch64

say "summary ($SECONDS s)"
printf '%s\n' "${RESULTS[@]}"
[ "$FAILED" = 0 ] && echo "device-check: PASS" || echo "device-check: FAIL"
exit "$FAILED"
