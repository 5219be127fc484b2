#!/usr/bin/env python3
"""Where a training step's time goes: a torch profiler trace of a few of the trainer's steps, reduced to figures.

`bench.py --profile N` traces N steps after the warm-up, in a pass of its own (the profiler slows the CPU down, so the
timed passes run without it), with the trainer's phases marked (`annotate`). `summarize` reads the trace (Chrome
format, as torch writes it) and gives, for each step: its wall time, the time the GPU was busy, the time it sat idle
and what the CPU was doing meanwhile (the phase that launched the kernel ending each gap), GPU time by phase, the time
in NCCL kernels (with several processes a collective also waits for the slowest one) and the CPU's waits on the GPU.

    python bench/step_profile.py TRACE.json.gz     # print the summary of a saved trace
"""
from __future__ import annotations

import bisect, functools, gzip, json, sys
from collections import defaultdict
from pathlib import Path

STEP = 'step'  # the annotation around each optimizer step
SYNCS = ('cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize', 'cudaMemcpy', 'cudaMemcpyAsync')


def _wrap(obj, name, label):
    from torch.profiler import record_function
    f = getattr(obj, name, None)
    if f is None or getattr(f, '_traced', False): return
    @functools.wraps(f)
    def marked(*a, **k):
        with record_function(label): return f(*a, **k)
    marked._traced = True
    setattr(obj, name, marked)


def annotate(trainer):
    "Mark the phases of `trainer`'s steps for the profiler (instance attributes only; the class is untouched)."
    # taide_ft's trainer runs all of a step's micro-batches in one training_step and calls the model itself, not compute_loss
    forward = (trainer.model, 'forward', 'forward') if hasattr(trainer, 'steps_data') else (trainer, 'compute_loss', 'forward')
    for obj, name, label in ((trainer, 'get_batch_samples', 'fetch'), (trainer, 'training_step', 'training_step'),
                             forward, (trainer.accelerator, 'backward', 'backward'),
                             (trainer.accelerator, 'clip_grad_norm_', 'clip'), (trainer, '_maybe_log_save_evaluate', 'log'),
                             (trainer.callback_handler, 'on_step_end', 'callbacks'), (trainer, 'data_collator', 'collate')):
        _wrap(obj, name, label)


def profile_callback(trainer, start:int, steps:int, path:Path):
    "A TrainerCallback (add it last) that traces optimizer steps start+1 .. start+steps, each inside a `step` annotation, and writes the trace to `path` (gzipped)."
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        "Windows from one step's end to the next (after a sync): all a step costs, logging and fetching its batches included."
        prof = rf = None
        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            if self.prof is False or step < start: return
            if torch.cuda.is_available(): torch.cuda.synchronize()
            if self.rf is not None: self.rf.__exit__(None, None, None); self.rf = None
            if self.prof is None:
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = profile(activities=acts, record_shapes=False, with_stack=False, profile_memory=False)
                self.prof.__enter__()
                if trainer.optimizer is not None: _wrap(trainer.optimizer, 'step', 'optimizer')
            if step < start + steps:
                self.rf = record_function(STEP); self.rf.__enter__()
                return
            self.prof.__exit__(None, None, None)
            raw = path.with_suffix('')  # torch writes plain JSON; kept gzipped
            self.prof.export_chrome_trace(str(raw))
            with open(raw, 'rb') as f, gzip.open(path, 'wb', compresslevel=6) as g: g.write(f.read())
            raw.unlink()
            self.prof = False
    annotate(trainer)
    return Profile()


def load(path) -> list:
    "The events of a Chrome-format trace (plain or gzipped JSON)."
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rt') as f: data = json.load(f)
    return data['traceEvents'] if isinstance(data, dict) else data


def _union(spans):
    "Total length of the union of (start, end) spans, and the merged spans."
    merged = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]: merged[-1][1] = max(merged[-1][1], e)
        else: merged.append([s, e])
    return sum(e - s for s, e in merged), merged


class _Labels:
    "The annotations (record_function ranges) of one CPU thread, to ask which ones enclose a moment."
    def __init__(self, spans):
        self.spans = sorted(spans)  # (start, end, name)
        self.starts = [s for s, _, _ in self.spans]
    def at(self, t) -> str:
        "The enclosing annotations of moment `t`, outermost first, joined by '/' ('-' if none)."
        i = bisect.bisect_right(self.starts, t)
        names = [n for s, e, n in self.spans[max(0, i - 64):i] if s <= t < e and n != STEP]
        return '/'.join(names) or '-'


def summarize(events, min_gap_us:float=100.0, top:int=6) -> dict:
    "Per-step figures from a trace made by `profile_callback` (times in ms); see the module's docstring."
    ms = lambda us: round(us / 1000, 2)
    ann = [e for e in events if e.get('ph') == 'X' and e.get('cat') == 'user_annotation']
    steps = sorted((e['ts'], e['ts'] + e['dur']) for e in ann if e['name'] == STEP)
    if not steps: return dict(error=f"no '{STEP}' annotations in the trace")
    gpu = [e for e in events if e.get('ph') == 'X' and e.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset')]
    runtime = [e for e in events if e.get('ph') == 'X' and e.get('cat') in ('cuda_runtime', 'cuda_driver')]  # driver: Triton's launches
    tid = max({e['tid'] for e in ann if e['name'] == STEP}, key=lambda t: sum(1 for e in ann if e['tid'] == t))
    labels = _Labels([(e['ts'], e['ts'] + e['dur'], e['name']) for e in ann if e['tid'] == tid])
    launch = {e['args']['correlation']: e['ts'] for e in runtime if 'correlation' in e.get('args', {})}
    def launched_in(k): return labels.at(launch.get(k.get('args', {}).get('correlation'), k['ts']))
    out = []
    for s0, s1 in steps:
        ks = sorted((k for k in gpu if s0 <= k['ts'] < s1), key=lambda k: k['ts'])
        busy, merged = _union([(k['ts'], min(k['ts'] + k['dur'], s1)) for k in ks])
        by_phase, nccl = defaultdict(float), 0.0
        for k in ks:
            by_phase[launched_in(k).split('/')[-1]] += k['dur']
            if 'nccl' in k['name'].lower(): nccl += k['dur']
        # idle stretches of the GPU inside the step, each put down to the phase that launched the kernel ending it
        idle, gaps, prev = defaultdict(float), [], s0
        firsts = {}
        for k in ks: firsts.setdefault(k['ts'], k)
        for a, b in merged:
            if a - prev >= min_gap_us:
                k = firsts.get(a)
                who = launched_in(k) if k else '-'
                idle[who] += a - prev; gaps.append((a - prev, prev - s0, who))
            prev = max(prev, b)
        if s1 - prev >= min_gap_us: idle['(step end)'] += s1 - prev; gaps.append((s1 - prev, prev - s0, '(step end)'))
        waits = defaultdict(float)
        for e in runtime:
            if s0 <= e['ts'] < s1 and e['name'].startswith(SYNCS) and e['dur'] >= min_gap_us: waits[f"{e['name']} in {labels.at(e['ts'])}"] += e['dur']
        wall = s1 - s0
        out.append(dict(wall_ms=ms(wall), gpu_busy_ms=ms(busy), gpu_idle_ms=ms(wall - busy), nccl_ms=ms(nccl), kernels=len(ks),
                        gpu_ms_by_phase={p: ms(v) for p, v in sorted(by_phase.items(), key=lambda x: -x[1])},
                        idle_ms_by_launcher={p: ms(v) for p, v in sorted(idle.items(), key=lambda x: -x[1])[:top]},
                        longest_gaps=[dict(ms=ms(g), at_ms=ms(t), launcher=w) for g, t, w in sorted(gaps, reverse=True)[:top]],
                        cpu_waits_ms={p: ms(v) for p, v in sorted(waits.items(), key=lambda x: -x[1])[:top]}))
    mean = lambda key: round(sum(s[key] for s in out) / len(out), 2)
    return dict(steps=len(out), mean=dict(wall_ms=mean('wall_ms'), gpu_busy_ms=mean('gpu_busy_ms'), gpu_idle_ms=mean('gpu_idle_ms'),
                                          nccl_ms=mean('nccl_ms')), per_step=out)


if __name__ == '__main__':
    for p in sys.argv[1:]:
        print(p); print(json.dumps(summarize(load(p)), indent=1, ensure_ascii=False))
