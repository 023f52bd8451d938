# run the experiment's teacher SFT for its first checkpoint (every 4 steps) and compare with the record
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ["CTKD_BENCH_CACHE_PROBE"] = "1"
from ctkd_bench import runner, zoo

name = sys.argv[1]
root = Path("/tmp/probe") / name
ckdir = root / "ck"
rec = json.load(
    open("/work/main/results/cpu-reference/sft__none--gemma3-270m__dolly__seed10__ddf0e6502a.json")
)["losses"]["curve"]


def watch():
    import torch

    while True:
        files = list(ckdir.glob("*.pt"))
        if files:
            time.sleep(3)
            ck = torch.load(files[0], mmap=True, weights_only=False, map_location="cpu")
            new = [c["loss"] for c in ck["curve"]]
            old = [c["loss"] for c in rec[: len(new)]]
            print(
                name,
                torch.backends.cpu.get_cpu_capability(),
                "steps",
                len(new),
                "equal"
                if new == old
                else [(i + 1, a, b) for i, (a, b) in enumerate(zip(old, new)) if a != b],
                flush=True,
            )
            os._exit(0)
        time.sleep(1)


threading.Thread(target=watch, daemon=True).start()
runner.finetune(
    zoo.resolve("gemma3-270m"),
    data="dolly",
    data_dir="/work/shared/data",
    train={"steps": 150, "batch_size": 4, "max_length": 256, "max_prompt_tokens": 128, "lr": 1e-4},
    results_dir=root / "r",
    device="cpu",
    progress=False,
    checkpoint_every=int(sys.argv[2]),
    checkpoint_dir=ckdir,
    log=lambda line: None,
)
