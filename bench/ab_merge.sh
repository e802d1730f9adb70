#!/bin/bash
# Old vs new side by side: times `python -m mergelab.cli merge RECIPE OUT` with two source trees, alternating
# which goes first, after one warm-up run each (numba cache, page cache).
#   usage: OLD=/path/to/old/src NEW=/path/to/new/src RECIPES=bench/_work/recipes bench/ab_merge.sh REPEATS METHOD...
# Outputs go to /tmp/io-out-* and are deleted after each run.
R=${RECIPES:-bench/_work/recipes}; N=$1; shift
OLD=${OLD:?set OLD to the old tree's src folder}; NEW=${NEW:?set NEW to the new tree's src folder}
PY=${PYTHON:-python}
for m in "$@"; do
  for v in old new; do src=$([ $v = old ] && echo $OLD || echo $NEW); PYTHONPATH=$src $PY -m mergelab.cli merge $R/$m.yml /tmp/io-out-warm-$v --overwrite --quiet >/dev/null 2>&1; rm -rf /tmp/io-out-warm-$v; done
  for r in $(seq $N); do
    for v in old new; do
      [ $((r % 2)) = 0 ] && v=$([ $v = old ] && echo new || echo old)
      src=$([ $v = old ] && echo $OLD || echo $NEW)
      rm -rf /tmp/io-out-$v
      s=$(date +%s.%N)
      PYTHONPATH=$src $PY -m mergelab.cli merge $R/$m.yml /tmp/io-out-$v --quiet >/dev/null 2>/tmp/io-out-err-$v.txt || { echo FAIL $v; tail -3 /tmp/io-out-err-$v.txt; }
      e=$(date +%s.%N)
      echo "$m $v $(echo "$e - $s" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
      rm -rf /tmp/io-out-$v
    done
  done
done
