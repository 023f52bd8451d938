#!/bin/bash
# usage: run.sh NAME [ENV=VAL ...]
cd /work/main && . .venv/bin/activate
name=$1; shift
rm -rf /tmp/probe/$name
env "$@" ctkd-bench finetune --model gemma3-270m --data dolly --data-dir ../shared/data --out /tmp/probe/$name/out --results-dir /tmp/probe/$name/r --steps 1 --batch-size 4 --max-length 256 --max-prompt-length 128 --lr 1e-4 --seed 10 --no-progress --device cpu > /tmp/probe/$name.log 2>&1
python -c "
import json,glob
r=json.load(open(glob.glob('/tmp/probe/$name/r/*.json')[0])); print('$name', '$*', r['losses']['curve'][0]['loss'])"
rm -rf /tmp/probe/$name/out
