"""Train-mode step: qwen-ft's fused loss vs Liger's (alternated, one process), then a profile of the loop step."""
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from qwen_ft.bench.run import BenchRequest, plan_cases, write_case
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import build_run
from qwen_ft.train import loop
from qwen_ft.train.feed import GroupFeed
import profile_step as ps

out, mb, shape = sys.argv[1], int(sys.argv[2]), (sys.argv[3:] or ["7b"])[0]
req = BenchRequest(shape=shape, methods=("lora",), lengths=(2048,), steps=8, warmup=0, baseline=False,
                   work_dir="/tmp/gc/bench", micro_batch=mb, overrides=("model.compile=true",))
_, case = write_case(Path(req.work_dir), plan_cases(req, Path(req.work_dir))[0])
tr, state = build_run(steps.checked_config(case["config"], ["model.compile=true", "train.output_dir=/tmp/gc/diag"]),
                          steps.distributed())
GPU = tr.plan.device.type == "cuda"
sync = torch.cuda.synchronize if GPU else (lambda: None)
ACT = [torch.profiler.ProfilerActivity.CUDA if GPU else torch.profiler.ProfilerActivity.CPU]
print("training mode:", tr.backend.module.training, flush=True)
class Null:
    def step(self, *a): pass
    def eval(self, *a): pass

def step(cache, feed):
    position, t0 = (state.epoch, state.batch_offset), time.perf_counter()
    hosts = feed.take(loop.next_group(tr, state, cache))
    feed.prepare(loop.group_at(tr, (state.epoch, state.batch_offset), cache)[0])
    loop.one_step(tr, state, (hosts, position, t0), Null())

def run(variant, n=3, prof=False):
    tr.loss_fn.liger = variant == "liger"
    state.step = 0; cache = {}; times = []; rep = None
    with GroupFeed(tr.host_group, tr.plan.device) as feed:
        for i in range(n):
            last = prof and i == n - 1
            if last:
                p = torch.profiler.profile(activities=ACT); p.__enter__()
            t = time.perf_counter(); step(cache, feed); sync(); times.append(time.perf_counter() - t)
            if last:
                p.__exit__(None, None, None); rep = ps.report(ps.leaf_times(p, GPU), 0, times[-1])
        if prof and GPU:
            rep["host_syncs"], sites = ps.count_syncs_gpu(lambda: step(cache, feed))
            rep["sync_sites"] = [{"site": k, "count": c} for k, c in sites.most_common(10)]
    return times, rep

if GPU: torch.cuda.reset_peak_memory_stats()
results = {"micro_batch": mb, "warm": run("liger", 2)[0]}
for r in range(3):
    for v in ("liger", "qwen-ft-loss"):
        t, _ = run(v, 3)
        results.setdefault(v, []).extend(t[1:])
        print(v, [round(x, 3) for x in t], flush=True)
for v in ("qwen-ft-loss", "liger"):
    t, rep = run(v, 2, prof=True)
    rep["busy"] = rep["kernel_s"] / rep["wall_s"]
    results[v + "-profile"] = rep
    print(v, "profiled: wall %.3f kernels %.3f busy %.0f%% syncs %d" % (rep["wall_s"], rep["kernel_s"], 100 * rep["busy"], rep["host_syncs"]), rep["split"], rep.get("sync_sites"), flush=True)
    for row in rep["top"][:12]:
        print(f"  {row['ms']:9.2f} ms {row['share']:6.1%}  {row['category']:<12} {row['name']}")
results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if GPU else 0
print("peak GiB", results["peak_gib"])
json.dump(results, open(out, "w"), indent=1)
