"""Why is a loop step (bench) slower than the profiled step? Time variants of one step, alternating."""
import json, sys, time
from contextlib import nullcontext
import torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "scripts"))
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import build_run
from qwen_ft.train import loop
from qwen_ft.train.feed import GroupFeed
import profile_step as ps

cfg, out = sys.argv[1], sys.argv[2]
tr, state = build_run(steps.checked_config(cfg, ["model.compile=true", "train.output_dir=/tmp/gc/diag"] + sys.argv[3:]),
                          steps.distributed())
dev = tr.plan.device
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
ACT = [torch.profiler.ProfilerActivity.CUDA if dev.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
class Null:
    def step(self, *a): pass
    def eval(self, *a): pass
real_guard = loop.weights_guard

def step(variant, cache, feed):
    position, t0 = (state.epoch, state.batch_offset), time.perf_counter()
    group = loop.next_group(tr, state, cache)
    if variant == "profile-like":
        loop.train_step(tr, tr.host_group(group)); tr.backend.step(tr.backend.clip()); state.step += 1
        return
    hosts = feed.take(group) if variant != "no-feed" else tr.host_group(group)
    if variant != "no-feed":
        feed.prepare(loop.group_at(tr, (state.epoch, state.batch_offset), cache)[0])
    loop.one_step(tr, state, (hosts, position, t0), Null())

def run(variant, n=3, prof=False):
    tr.loss_fn.liger = variant != "no-liger"
    loop.weights_guard = real_guard if variant != "no-guard" else (lambda *a: None)
    state.step = 0; cache = {}; times = []; rep = None
    with GroupFeed(tr.host_group, dev) as feed:
        for i in range(n):
            ctx = torch.profiler.profile(activities=ACT) if prof and i == n - 1 else nullcontext()
            with ctx as p:
                t = time.perf_counter(); step(variant, cache, feed); sync(); times.append(time.perf_counter() - t)
            if prof and i == n - 1:
                rep = ps.report(ps.leaf_times(p, dev.type == "cuda"), 0, times[-1])
    return times, rep

results = {}
run("loop", 2)  # compile + warm-up
variants = ["loop", "profile-like", "no-feed", "no-guard", "no-liger"]
for r in range(2):
    for v in variants:
        t, _ = run(v, 3)
        results.setdefault(v, []).extend(t[1:])
        print(v, [round(x, 3) for x in t], flush=True)
for v in ("loop", "profile-like"):
    t, rep = run(v, 2, prof=True)
    results[v + "-profiled"] = {"times": t, "wall": rep["wall_s"], "kernel_s": rep["kernel_s"], "split": rep["split"]}
    print(v, "profiled", t, rep["kernel_s"], rep["split"], flush=True)
json.dump(results, open(out, "w"), indent=1)
