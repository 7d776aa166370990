"""Memory of ``linquant quantize`` (streaming) on MoE checkpoints, against loading the model.

Writes two random checkpoints with transformers' ``save_pretrained`` into a temporary folder
(or ``--dir``): a Mixtral-shaped one, which transformers 5 saves one tensor per expert (the
stream stacks them into the model's fused projections), and a GPT-OSS-shaped one, whose experts
are stored fused ``[E, in, out]``. For each, in fresh processes: ``quantize_checkpoint`` (the
stream), and ``from_pretrained`` + ``quantize_model`` + ``save`` (in memory). Printed per run:
the peak of anonymous memory above the process's baseline after importing torch, transformers
and linquant (sampled every 2 ms from ``/proc/self/status`` ``RssAnon``; file pages that
safetensors maps are not in it), and the peak RSS (``VmHWM``, mapped file pages included).

Each run is made twice: with glibc's default allocator, whose dynamic mmap threshold rises as
large blocks are freed and then keeps later ones in the heap (so its peaks vary from run to run
by the order of allocations: a Mixtral-shaped stream measured 272-475 MiB over eight runs), and
with ``MALLOC_MMAP_THRESHOLD_=1048576``, where every block of 1 MiB or more is mapped and
returned on free, so the figure is what the code holds (the same to 1% run to run; the stream
then took 9.8 s instead of 6.3 s, the kernel zeroing each fresh mapping).

    python benchmarks/bench_stream_memory.py [--preset w4a16-g32] [--dir PATH]

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import machine

_BUILD = textwrap.dedent("""
    import sys, torch, transformers
    torch.manual_seed(0)
    kind, folder = sys.argv[1], sys.argv[2]
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(
            vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
            num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.GptOssConfig(
            vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_local_experts=16,
            num_experts_per_tok=2)
        model = transformers.GptOssForCausalLM(cfg)
    model.save_pretrained(folder, max_shard_size="200MB")
""")

_MEASURE = textwrap.dedent("""
    import shutil, sys, threading, time
    import torch, transformers
    import linquant as lq
    from linquant.io.stream import quantize_checkpoint

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

    how, src, dst, preset = sys.argv[1:5]
    base = status("RssAnon")
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], status("RssAnon"))
            time.sleep(0.002)

    thread = threading.Thread(target=watch)
    thread.start()
    shutil.rmtree(dst, ignore_errors=True)
    if how == "stream":
        quantize_checkpoint(src, dst, preset)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(src)
        lq.quantize_model(model, preset)
        lq.save(model, dst)
    done.set()
    thread.join()
    peak[0] = max(peak[0], status("RssAnon"))
    print(f"{peak[0] - base:.0f} {status('VmHWM'):.0f}")
""")


def _checkpoint_facts(folder: Path) -> tuple[float, float, int, int]:
    from safetensors import safe_open

    total = largest = 0
    count = experts = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118
                sl = h.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                size = n * 4 if sl.get_dtype() == "F32" else n * 2
                total += size
                largest = max(largest, size)
                count += 1
                experts += ".experts." in name
    return total / 2**20, largest / 2**20, count, experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="w4a16-g32")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (a temp dir)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print("command: " + shlex.join(["python", *sys.argv]))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind in ("mixtral", "gpt_oss"):
            src = Path(tmp) / kind
            subprocess.run([sys.executable, "-c", _BUILD, kind, str(src)], check=True,
                           capture_output=True)
            size, largest, count, experts = _checkpoint_facts(src)
            print(f"\n{kind}: {size:.0f} MiB in {count} tensors ({experts} of experts), largest "
                  f"tensor {largest:.0f} MiB")
            for how in ("stream", "in memory"):
                for malloc in ("default", "mmap >= 1 MiB"):
                    env = dict(os.environ)
                    env.pop("MALLOC_MMAP_THRESHOLD_", None)
                    if malloc != "default":
                        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
                    out = subprocess.run(
                        [sys.executable, "-c", _MEASURE, how.split()[0], str(src),
                         str(Path(tmp) / f"{kind}-q"), args.preset],
                        check=True, capture_output=True, text=True, env=env)
                    anon, hwm = (float(v) for v in out.stdout.split()[-2:])
                    print(f"  {how:10s} {malloc:14s} anonymous memory peak +{anon:.0f} MiB "
                          f"above the imports, peak RSS {hwm:.0f} MiB")


if __name__ == "__main__":
    main()
