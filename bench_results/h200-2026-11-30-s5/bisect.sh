#!/usr/bin/env bash
# Which commit made run.py --random-weights hang in its first decode step on a 1x2 mesh of
# 2 x H200 at depth (session 4: 24 and 48 layers hang on e1daae4; 2 layers do not)?
# Each commit's tree is in .scratch/bisect/<sha> (git archive). First the known-good
# candidate c60a8b5 (before session 3's decode changes); then a binary search.
T0=$SECONDS
LAYERS=${LAYERS:-24}
LIMIT=${LIMIT:-100}
mkdir -p /tmp/b
trap 'tar czf "${OUT:-/tmp}/bisect.tgz" -C /tmp b' EXIT
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
ROOT=$PWD
ok() {  # 0: the run finished; 1: it hung or failed
  local c=$1
  (cd "$ROOT/.scratch/bisect/$c" && PYTHONPATH=/tmp/site timeout -s ABRT $LIMIT python3 -X faulthandler run.py \
      --random-weights --layers $LAYERS --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) \
      > /tmp/b/$c.log 2>&1
  local rc=$?
  log "$c: exit $rc; $(grep -m1 'tokens in' /tmp/b/$c.log)$(grep -m1 -A1 'Current thread' /tmp/b/$c.log | tail -1)"
  return $rc
}
LIST=(744e99b e67d8e3 7643669 8a434e6 9ab04a6 6e623bd c438b5d e07404f ff418a1 e1daae4)
if ! ok c60a8b5; then log "c60a8b5 hangs too: not a session-3 change (environment or older)"; exit 0; fi
lo=-1; hi=$((${#LIST[@]} - 1))   # LIST[hi] hangs (e1daae4, measured); find the first that hangs
while [ $((hi - lo)) -gt 1 ]; do
  mid=$(((lo + hi) / 2))
  if ok ${LIST[$mid]}; then lo=$mid; else hi=$mid; fi
done
good=c60a8b5; [ $lo -ge 0 ] && good=${LIST[$lo]}
log "first hanging commit: ${LIST[$hi]} (last good: $good)"
