#!/usr/bin/env bash
# Compatibility matrix: lightning-clip in fresh virtualenvs that each hold ONE Lightning package, installed
# the way a user would (`pip install "<package>==X" "lightning-clip[<extra>]"`), checking in each:
#   * which namespaces import (a `lightning` install also brings `pytorch-lightning`: pip resolves it so),
#   * the README quick-start written for that namespace,
#   * examples/lightning_cli run through that namespace's LightningCLI,
#   * pytest tests/namespaces.
# Plus one venv with `lightning` and pytorch-lightning removed (lightning.pytorch alone).
#
# Time: torch (pinned, CPU) and the test tools go once into a base venv that every cell sees through a .pth
# file, so pip resolves each cell's Lightning dependencies against an installed torch and downloads only
# Lightning's own packages; cells are built in parallel. About 5 minutes on a 2-core machine.
#   COMPAT_DIR   where the venvs go (default build/compat; reused when present: COMPAT_FRESH=1 rebuilds)
#   COMPAT_CELLS which cells (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY=${PY:-python3}
DIR=${COMPAT_DIR:-$ROOT/build/compat}
CELLS=${COMPAT_CELLS:-"lightning-2.6 lightning-2.5 pytorch-lightning-2.6 pytorch-lightning-2.5 lightning-alone"}
mkdir -p "$DIR"
start=$(date +%s)

spec() {  # cell -> "<requirement> <extra>"
  case "$1" in
    lightning-2.6) echo "lightning==2.6.6 lightning" ;;
    lightning-2.5) echo "lightning==2.5.6 lightning" ;;
    pytorch-lightning-2.6) echo "pytorch-lightning==2.6.6 pytorch-lightning" ;;
    pytorch-lightning-2.5) echo "pytorch-lightning==2.5.6 pytorch-lightning" ;;
    lightning-alone) echo "lightning==2.6.6 lightning" ;;
    *) echo "unknown cell $1" >&2; exit 2 ;;
  esac
}

base="$DIR/base"
if [ -n "${COMPAT_FRESH:-}" ] || [ ! -f "$base/.ready" ]; then
  rm -rf "$base"
  "$PY" -m venv "$base"
  "$base/bin/pip" install -q torch==2.13.0   # first and pinned: the CPU build (a range pulls CUDA packages)
  "$base/bin/pip" install -q pytest pytest-timeout "jsonargparse[signatures]>=4.27" numpy tensorboard setuptools
  touch "$base/.ready"
fi
base_site=$("$base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# lightning-clip as a wheel, built once (the cells install it as users do, with an extra)
rm -rf "$DIR/wheel" && "$base/bin/pip" wheel -q --no-deps --no-build-isolation -w "$DIR/wheel" "$ROOT" > /dev/null
wheel=$(ls "$DIR"/wheel/lightning_clip-*.whl)
echo "compat: base venv and $(basename "$wheel") ready ($(( $(date +%s) - start )) s)"

build() {
  local cell=$1 v="$DIR/$1" req extra
  read -r req extra <<<"$(spec "$cell")"
  rm -rf "$v"
  "$PY" -m venv "$v"
  echo "$base_site" > "$("$v/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_compat_base.pth"
  "$v/bin/pip" install -q "$req" "$wheel[$extra]" > "$v.install.log" 2>&1 || { cat "$v.install.log"; return 1; }
  if [ "$cell" = lightning-alone ]; then "$v/bin/pip" uninstall -q -y pytorch-lightning >> "$v.install.log" 2>&1; fi
}

pids=()
for cell in $CELLS; do build "$cell" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "compat: cells installed ($(( $(date +%s) - start )) s)"

failed=0
for cell in $CELLS; do
  v="$DIR/$cell"
  py="$v/bin/python"
  work=$(mktemp -d)
  echo "=== compat cell $cell: $("$v/bin/pip" list 2>/dev/null | grep -i -E '^(lightning|pytorch-lightning|torch|lightning-clip) ' | tr -s ' ' | tr '\n' ' ')"
  case "$cell" in
    pytorch-lightning-*) ns=pytorch_lightning; expect_both=0 ;;
    lightning-alone) ns=lightning; expect_both=0 ;;
    *) ns=lightning; expect_both=1 ;;
  esac
  # `set -e` holds inside the subshell only when its status is not tested by || or if: test it after.
  set +e
  (
    set -e
    cd "$work"
    export OMP_NUM_THREADS=1
    # which namespaces import: as pip resolved them
    "$py" - "$ns" "$expect_both" <<'PYEOF'
import importlib.util, sys
ns, both = sys.argv[1], sys.argv[2] == "1"
have = {m: importlib.util.find_spec(m) is not None for m in ("pytorch_lightning", "lightning")}
want = {"pytorch_lightning": ns == "pytorch_lightning" or both, "lightning": ns == "lightning"}
assert have == want, f"namespaces installed {have}, expected {want}"
import lightning_clip, lightning_clip._namespace as c
print("namespaces:", sorted(c.lightning_namespaces()), "| lightning_clip from", lightning_clip.__file__)
PYEOF
    # the README quick-start for this namespace
    "$py" "$ROOT/.ci/readme_snippet.py" "$ns" > quickstart.py
    "$py" quickstart.py > quickstart.log 2>&1 || { cat quickstart.log; exit 1; }
    grep -q "max_steps=50" quickstart.log && echo "README quick-start (import $ns): 50 steps"
    # examples/lightning_cli through this namespace's LightningCLI
    cp -r "$ROOT/examples" ex
    if [ "$ns" = lightning ]; then
      sed -i 's/pytorch_lightning/lightning.pytorch/g' ex/adding_problem.py ex/lightning_cli/train.py ex/lightning_cli/config.yaml
      grep -q "lightning.pytorch.cli import LightningCLI" ex/lightning_cli/train.py
    fi
    # Lightning 2.5.x's LightningCLI turns an integer val_check_interval into a float and its Trainer then
    # refuses it for step-based validation (pytorch-lightning#21259, fixed in 2.6): validate per epoch there
    # (the example's train stream is endless, so no validation runs in these 12 steps either way)
    extra=()
    case "$cell" in *-2.5) extra=(--trainer.val_check_interval=null --trainer.check_val_every_n_epoch=1) ;; esac
    "$py" ex/lightning_cli/train.py fit --config ex/lightning_cli/config.yaml --trainer.max_steps=12 \
      --trainer.enable_progress_bar=false --trainer.enable_model_summary=false "${extra[@]}" \
      --trainer.logger.init_args.save_dir="$work/runs" --data.seq_len=12 --data.val_size=32 > cli.log 2>&1 \
      || { cat cli.log; exit 1; }
    grep -q "max_steps=12" cli.log && echo "examples/lightning_cli: 12 steps with $([ "$ns" = lightning ] && echo lightning.pytorch || echo pytorch_lightning).cli.LightningCLI"
    # the namespace tests, against the installed wheel (no conftest: it would put the source tree first)
    OMP_NUM_THREADS=1 "$py" -m pytest -q -p no:cacheprovider --noconftest -o addopts="" "$ROOT/tests/namespaces"
  )
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then echo "compat cell $cell FAILED (exit $rc)"; failed=1; fi
  rm -rf "$work"
done
echo "compat: done in $(( $(date +%s) - start )) s"
exit $failed
