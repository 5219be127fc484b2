#!/usr/bin/env python3
"""What a new batch shape costs: the forward + backward of every grouped micro-batch of bench.py's `mix` workload,
timed the first time its shape runs and again once every shape has run, on taide_ft's default path (setup `a`).

Each variant (`--buckets`: the `multiple` of `taide_ft.training.bucket_length`; `--attention`: SDPA's backend) runs in fresh processes that share one
new compiler cache: first one process that takes all micro-batches twice (pass 1, pass 2) and then a few probes, then,
with `--world N`, N processes that each take the micro-batches rank r of N processes would take (r, r + N, ... of each
step), one pass, to estimate N-GPU steps as the slowest rank's step. The estimate leaves out the gradient all-reduce
(LoRA gradients: tens of MB) and the optimizer step, which cost the same for every shape.

    python bench/shapes.py --model-dir /dev/shm/llama8b --buckets 8,16,64 --world 2
"""
from __future__ import annotations

import argparse, json, os, random, statistics, subprocess, sys, tempfile, time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import bench as B  # noqa: E402


def micro_batches(ds, tok, bucket):
    "The mix workload's grouped micro-batches, padded as the collator pads them, in a seeded random order (not dealt by work)."
    from taide_ft.training import PadCollator, group_rows
    seq = B.seq_of('mix')
    groups = group_rows(ds['length'], B.BATCH * seq, B.SEED, bucket, seq)
    order = list(range(len(groups)))
    random.Random(B.SEED).shuffle(order)
    coll = PadCollator(tok.pad_token_id, bucket, seq, companion=True)  # as the trainer's collator on a GPU
    return [coll([{'input_ids': ds[j]['input_ids'], 'labels': ds[j]['labels']} for j in groups[i]]) for i in order]


def timed(model, batch, dev, sync):
    "Seconds of one forward + backward, and the graphs dynamo compiled meanwhile."
    import torch
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    b = {k: v.to(dev) for k, v in batch.items()}
    sync(); t = time.perf_counter()
    model(**b).loss.backward()
    sync()
    return time.perf_counter() - t, torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs


def record(model, batch, dev, sync):
    "One forward + backward: its shape, seconds and new graphs."
    seconds, graphs = timed(model, batch, dev, sync)
    return dict(shape=list(batch['input_ids'].shape), seconds=seconds, graphs=graphs)


def profile_top(model, batch, dev, sync, n=12):
    "The ops of one forward + backward with the most CPU time of their own (ms)."
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as p: timed(model, batch, dev, sync)
    ops = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [dict(op=e.key[:80], calls=e.count, self_cpu_ms=round(e.self_cpu_time_total / 1e3, 1)) for e in ops]


def worker(a):
    import torch
    res = dict(bucket=a.bucket, attention=a.attention, world=a.world, rank=a.rank, status='started')
    if torch.cuda.is_available(): torch.backends.cuda.enable_cudnn_sdp(a.attention == 'cudnn')
    save = lambda: Path(a.result).write_text(json.dumps(res, indent=1))
    save()
    t0 = time.perf_counter()
    setup = B.SetupA(SimpleNamespace(model_dir=a.model_dir, out_root=a.out_root, warmup=a.warmup, steps=a.steps, setup='a', workloads=['mix']))
    model, tok, _ = setup.load()
    res['load_seconds'] = round(time.perf_counter() - t0, 1)
    dev = next(p.device for p in model.parameters())
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    steps = a.warmup + a.steps
    mbs = micro_batches(B.make_dataset('mix', steps), tok, a.bucket)[:steps * B.ACCUM]
    shape = lambda b: list(b['input_ids'].shape)
    model.train()
    if a.rank is None:  # every micro-batch, twice
        for p in (1, 2):
            res[f'pass{p}'] = [record(model, b, dev, sync) for b in mbs]
            model.zero_grad(set_to_none=True)
            save()
        seen = {tuple(shape(b)) for b in mbs}
        one = next(b for b in mbs if shape(b)[0] > 1)
        single = {k: v[:1] for k, v in one.items()}  # a micro-batch of one row at a length already run with more rows
        res['probe_one_row'] = [record(model, single, dev, sync) for _ in range(2)]
        from taide_ft.training import bucket_length
        fresh = next((n for n in range(64, B.seq_of('mix'), 8) if n not in {s[1] for s in seen} and n == bucket_length(n, a.bucket)), None)
        if fresh is None: res['status'] = 'ok'; return save()
        ids = torch.randint(0, B.TOKEN_HI, (max(2, B.BATCH * B.seq_of('mix') // fresh), fresh))
        mask, labels = torch.ones_like(ids), ids.clone()
        mask[-1, fresh // 2:], labels[-1, fresh // 2:] = 0, -100  # the last row padded, as grouped micro-batches are
        new = dict(input_ids=ids, attention_mask=mask, labels=labels)  # a length no micro-batch had
        res['probe_new_length'] = dict(shape=shape(new), first=profile_top(model, new, dev, sync), again=profile_top(model, new, dev, sync))
    else:  # what rank `rank` of `world` processes takes: micro-batches rank, rank + world, ... of each step's ACCUM
        per_step = []
        for s in range(steps):
            mine = mbs[s * B.ACCUM:(s + 1) * B.ACCUM][a.rank::a.world]
            runs = [record(model, b, dev, sync) for b in mine]
            per_step.append(dict(shapes=[r['shape'] for r in runs], seconds=sum(r['seconds'] for r in runs), graphs=sum(r['graphs'] for r in runs)))
            model.zero_grad(set_to_none=True)
        res['steps'] = per_step
    res['status'] = 'ok'
    save()


def summary(r, warmup):
    "First-pass cost over the second, per micro-batch and in all; shapes; graphs compiled."
    p1, p2 = r['pass1'], r['pass2']
    t1, t2 = sum(x['seconds'] for x in p1[warmup * B.ACCUM:]), sum(x['seconds'] for x in p2[warmup * B.ACCUM:])
    extra = [x['seconds'] - y['seconds'] for x, y in zip(p1, p2)]
    new = [i for i, x in enumerate(p1) if tuple(x['shape']) not in {tuple(y['shape']) for y in p1[:i]}]
    return dict(micro_batches=len(p1), shapes=len(new), timed_pass1_seconds=round(t1, 3), timed_pass2_seconds=round(t2, 3),
                timed_ratio=round(t1 / t2, 3), graphs_pass1=sum(x['graphs'] for x in p1), graphs_pass2=sum(x['graphs'] for x in p2),
                extra_median_new_shape_ms=round(1e3 * statistics.median(extra[i] for i in new), 1),
                extra_median_seen_shape_ms=round(1e3 * statistics.median([e for i, e in enumerate(extra) if i not in new] or [0]), 1),
                pass2_median_ms=round(1e3 * statistics.median(x['seconds'] for x in p2), 1))


def estimate(one, ranks, warmup):
    "Timed steps of one process against the slowest rank of N at each step (tokens a step are the same)."
    acc = B.ACCUM
    single = [sum(x['seconds'] for x in one['pass1'][s * acc:(s + 1) * acc]) for s in range(len(one['pass1']) // acc)]
    slow = [max(r['steps'][s]['seconds'] for r in ranks) for s in range(len(single))]
    t1, tn = sum(single[warmup:]), sum(slow[warmup:])
    return dict(one_process_seconds=round(t1, 3), slowest_rank_seconds=round(tn, 3), estimated_scaling=round(t1 / tn, 3),
                rank_seconds=[round(sum(x['seconds'] for x in r['steps'][warmup:]), 3) for r in ranks])


def driver(a):
    report = dict(args=dict(buckets=a.buckets, attention=a.attention, world=a.world, warmup=a.warmup, steps=a.steps, model_dir=str(a.model_dir)),
                  versions=B.versions(), variants={})
    start = time.perf_counter()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix='taide-shapes-'))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out or f'shapes-{time.strftime("%Y%m%d-%H%M%S")}.json')
    for bucket, attention in [(b, x) for b in a.buckets for x in a.attention]:
        name = f'{bucket}-{attention}'
        cache = work/f'cache-{name}'  # one fresh compiler cache a variant, shared by its processes in turn
        env = dict(os.environ, **B.OFFLINE_ENV, TORCHINDUCTOR_CACHE_DIR=str(cache/'inductor'), TRITON_CACHE_DIR=str(cache/'triton'))
        env['PYTHONPATH'] = os.pathsep.join([str(HERE.parent)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
        v = report['variants'][name] = {}
        for rank in [None] + list(range(a.world if a.world > 1 else 0)):
            if time.perf_counter() - start > a.budget: v['skipped'] = 'budget'; break
            res = work/f'{name}-{rank}.json'
            argv = [sys.executable, __file__, '--_worker', '--bucket', str(bucket), '--attention', attention, '--world', str(a.world), '--result', str(res),
                    '--model-dir', str(a.model_dir), '--warmup', str(a.warmup), '--steps', str(a.steps), '--max-length', str(a.max_length)] + (['--rank', str(rank)] if rank is not None else [])
            with open(work/f'{name}-{rank}.log', 'w') as f: rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
            r = json.loads(res.read_text()) if res.exists() else {}
            if rc or r.get('status') != 'ok':
                v['error'] = f"rc {rc}: " + B.tail(work/f'{name}-{rank}.log', 8); break
            v['one' if rank is None else f'rank{rank}'] = r
        if 'one' in v:
            v['summary'] = summary(v['one'], a.warmup)
            ranks = [v[f'rank{r}'] for r in range(a.world) if f'rank{r}' in v]
            if a.world > 1 and len(ranks) == a.world: v['estimate'] = estimate(v['one'], ranks, a.warmup)
        out.write_text(json.dumps(report, indent=1))
        print(f"{name}: {json.dumps({k: v[k] for k in ('summary', 'estimate', 'error', 'skipped') if k in v})}", flush=True)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model-dir', type=Path, default=Path('/dev/shm/llama8b'), help="the model bench.py builds (default /dev/shm/llama8b)")
    p.add_argument('--buckets', default='8', help="comma-separated `multiple`s of bucket_length to compare (default 8)")
    p.add_argument('--attention', default='cudnn', help="comma-separated SDPA backends to compare: cudnn (PyTorch's default on Hopper, "
                   "a new plan for each new shape) and efficient (cuDNN's switched off) (default cudnn)")
    p.add_argument('--world', type=int, default=1, help="also estimate this many GPUs from one process a rank (default 1: no)")
    p.add_argument('--warmup', type=int, default=4, help="steps left out of the totals (default 4)")
    p.add_argument('--steps', type=int, default=10, help="steps in the totals (default 10)")
    p.add_argument('--budget', type=float, default=480, help="seconds; processes that would start later are skipped (default 480)")
    p.add_argument('--out', help="the JSON report (default shapes-DATE.json)")
    p.add_argument('--max-length', type=int, default=B.seq_of('mix'), help=f"tokens a row at most (default {B.seq_of('mix')}; lower only for quick checks)")
    p.add_argument('--work', help="where the processes' logs and results go (default a new temporary folder)")
    p.add_argument('--out-root', type=Path, default=Path('/dev/shm/bench-out'), help=argparse.SUPPRESS)
    p.add_argument('--_worker', dest='worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--bucket', type=int, help=argparse.SUPPRESS)
    p.add_argument('--rank', type=int, help=argparse.SUPPRESS)
    p.add_argument('--result', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    B.MAX_LENGTH = a.max_length
    a.buckets = [int(x) for x in str(a.buckets).split(',') if x.strip()]
    if not a.worker: a.attention = [x.strip() for x in a.attention.split(',') if x.strip()]
    if set([a.attention] if a.worker else a.attention) - {'cudnn', 'efficient'}: p.error("--attention takes cudnn and efficient")
    return worker(a) if a.worker else driver(a)


if __name__ == '__main__':
    sys.exit(main())
