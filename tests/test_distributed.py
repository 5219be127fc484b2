"""Two processes (torchrun, gloo on CPU) train like one process with the same step: each step's rows are dealt to the
processes (each gets at least one, together the one-process step's rows), the losses and adapter match, only rank 0
writes files (the trainer's per-rank random state aside), and a run resumed from a checkpoint ends with the same adapter."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
from test_training import MALLOC_ENV, ROWS, make_run, tiny  # noqa: F401  (tiny is a fixture)

ROOT = Path(__file__).resolve().parents[1]

# What `taide-ft run` does up to training, plus two records for the test: the rows each training forward received
# (a forward pre-hook), grouped by optimizer step (an optimizer step hook), and every file this process opened for
# writing, renamed, made or removed under OUTPUT_DIR (Python's audit hook sees them all, whichever library does it).
WORKER = r"""import json, os, sys
from pathlib import Path
from taide_ft.config import load_config
cfg = load_config(sys.argv[1])
odir, writes = str(Path(cfg.output_dir).resolve()), []
def audit(event, args):
    if event == 'open' and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        wants = any(c in mode for c in 'wax+') if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        path = os.path.abspath(os.fsdecode(args[0]))
        if wants and path.startswith(odir): writes.append(path)
    elif event in ('os.rename', 'os.mkdir', 'os.remove', 'os.rmdir', 'shutil.rmtree', 'shutil.move', 'os.symlink'):
        if isinstance(args[0], (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(args[0])).startswith(odir):
            writes.append(event + ' ' + os.path.abspath(os.fsdecode(args[0])))
sys.addaudithook(audit)
from torch.optim.optimizer import register_optimizer_step_post_hook
from taide_ft.dataset import build_dataset
from taide_ft.environment import make_plan
from taide_ft.model import add_lora, load_model
from taide_ft.training import train
plan = make_plan(cfg)
model, tok = load_model(cfg, plan)
data = build_dataset(cfg, tok)
model = add_lora(model, cfg, plan)
steps, cur = [], []  # steps: for each optimizer step, this process's micro-batches, each a list of rows (token ids)
def hook(mod, args, kw):
    if mod.training:
        ids, am = kw['input_ids'], kw['attention_mask']
        cur.append([ids[i][am[i].bool()].tolist() for i in range(ids.shape[0])])
def stepped(opt, args, kw):
    steps.append(list(cur)); cur.clear()
model.register_forward_pre_hook(hook, with_kwargs=True)
register_optimizer_step_post_hook(stepped)
stats = train(cfg, plan, model, tok, data)
rank = int(os.environ.get('RANK', 0))
Path(sys.argv[2], f'rank{rank}.json').write_text(json.dumps(dict(steps=steps, writes=writes, tokens=stats.tokens,
    processes=stats.processes, plan_processes=plan.processes, rows_per_step=stats.rows_per_step,
    losses=[h['loss'] for h in stats.log_history if 'loss' in h])))
"""

STEPS, BATCH, ACCUM = 3, 2, 2


def run_worker(tmp, tiny, n, again=False, **kw):
    kw = dict(dict(batch=BATCH, accum=ACCUM, steps=STEPS, save=2, lr=1e-2), **kw)
    ini = make_run(tmp/f'p{n}', tiny, **kw)
    rec = tmp/f"rec{n}{'-again' if again else ''}"; rec.mkdir()
    worker = tmp/'worker.py'; worker.write_text(WORKER)
    launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={n}'] if n > 1 else [])
    env = dict(os.environ, **MALLOC_ENV, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    p = subprocess.run(launch + [str(worker), str(ini), str(rec)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return ini.parent/'out', [json.loads((rec/f'rank{r}.json').read_text()) for r in range(n)], p.stdout + p.stderr


def files(d):
    "Files under `d`, with the trainer's random-state files (one per rank) named alike."
    return sorted({re.sub(r'rng_state(_\d+)?\.pth$', 'rng_state.pth', str(p.relative_to(d))) for p in d.rglob('*') if p.is_file()})


rows_of = lambda step: sorted(map(tuple, (r for mb in step for r in mb)))  # a step's rows, whatever its micro-batches


def same_adapter(a, b, **tol):
    import torch
    from safetensors.torch import load_file
    w1, w2 = load_file(a/'adapter'/'adapter_model.safetensors'), load_file(b/'adapter'/'adapter_model.safetensors')
    assert w1.keys() == w2.keys() and len(w1) > 0
    for k in w1: assert torch.allclose(w1[k], w2[k], **tol), (k, (w1[k] - w2[k]).abs().max())
    return w1


def test_two_processes_train_like_one(tmp_path, tiny):
    """PACKING = auto: a step is BATCH x ACCUM rows whichever the processes; two processes deal each step's rows
    between them by work (each at least one row) and average the loss over the whole step's answer tokens."""
    from safetensors.torch import load_file
    from taide_ft.training import micro_batch_cost
    out1, (one,), _ = run_worker(tmp_path, tiny, 1)
    out2, (r0, r1), _ = run_worker(tmp_path, tiny, 2)
    assert (one['plan_processes'], r0['plan_processes'], r1['plan_processes']) == (1, 2, 2)

    # each step: BATCH x ACCUM rows on one process; on two, those same rows, dealt (none twice, none lost)
    assert len(one['steps']) == len(r0['steps']) == len(r1['steps']) == STEPS
    config = json.loads((Path(tiny)/'config.json').read_text())
    work = lambda step: sum(micro_batch_cost(1, len(r), config) for mb in step for r in mb)
    for k in range(STEPS):
        a, b, want = rows_of(r0['steps'][k]), rows_of(r1['steps'][k]), rows_of(one['steps'][k])
        assert len(want) == BATCH * ACCUM, f"step {k + 1}: {len(want)} rows"
        assert a and b, f"step {k + 1}: a process got no row"
        assert sorted(a + b) == want, f"step {k + 1}: the two processes' rows are not the one-process step's rows"
        heaviest = max(work([[r]]) for r in a + b)  # dealt heaviest first to the least loaded: loads differ by at most one row's work
        assert abs(work(r0['steps'][k]) - work(r1['steps'][k])) <= heaviest + 1e-6, f"step {k + 1}: unbalanced"

    # the same training: losses, tokens, rows a step and the adapter's weights
    assert r0['processes'] == 2 and one['processes'] == 1
    assert r0['tokens'] == r1['tokens'] == one['tokens'] == sum(len(x) for s in one['steps'] for mb in s for x in mb)
    assert r0['rows_per_step'] == one['rows_per_step'] == BATCH * ACCUM
    assert len(r0['losses']) == STEPS and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r0['losses'], one['losses'])), (r0['losses'], one['losses'])
    assert r1['losses'] == r0['losses']
    w1 = same_adapter(out1, out2, atol=1e-5, rtol=1e-3)
    moved = max((w1[k] - w0).abs().max().item() for k, w0 in load_file(out1/'checkpoint-2'/'adapter_model.safetensors').items())
    assert moved > 1e-3  # the adapter trained between step 2 and the end

    # only rank 0 writes: the same files as one process; rank 1 wrote only its random state in each checkpoint
    assert files(out2) == files(out1)
    # (the trainer makes the checkpoint folder in each process before saving that process's random state in it)
    assert all(Path(w).name == 'rng_state_1.pth' or re.fullmatch(r'os\.mkdir .*/checkpoint-\d+', w) for w in r1['writes']), r1['writes']
    # (torch and safetensors write through C++, which the audit hook does not see; the file list above covers them)
    assert any(w.endswith('train_stats.json') or 'train_stats.json' in w for w in r0['writes']), r0['writes']
    text = (out2/'finetune.log').read_text(encoding='utf-8')
    assert 'on CPU x 2 processes' in text and f"{STEPS} steps x {BATCH * ACCUM} rows" in text
    assert f"step {STEPS}/{STEPS}" in text and '[rank 1]' not in text
    assert text.count(f"step {STEPS}/{STEPS} | loss") == 1  # progress is logged once, by rank 0

    # resume: lose what came after checkpoint-2, as a run stopped there would; two processes finish the same adapter
    shutil.rmtree(out2/'checkpoint-3'); shutil.rmtree(out2/'adapter'); (out2/'train_stats.json').unlink()
    out3, (a0, a1), _ = run_worker(tmp_path, tiny, 2, again=True)
    assert 'resuming from checkpoint-2 (step 2/3)' in (out3/'finetune.log').read_text(encoding='utf-8')
    assert len(a0['steps']) == len(a1['steps']) == 1
    assert (rows_of(a0['steps'][0]), rows_of(a1['steps'][0])) == (rows_of(r0['steps'][2]), rows_of(r1['steps'][2]))
    same_adapter(out3, out2, atol=1e-6)


def test_two_processes_deal_grouped_micro_batches(tmp_path, tiny):
    """PACKING = group: each step's micro-batches are the one-process step's, dealt by work (the heavier to rank 0
    when each takes one); losses and adapter match one process's, across an epoch boundary and a resume."""
    from taide_ft.training import micro_batch_cost
    kw = dict(packing='group', batch=1, seq=64)  # 8 rows make 4 micro-batches of 1-3 rows: an epoch is 2 steps
    out1, (one,), _ = run_worker(tmp_path, tiny, 1, **kw)
    out2, (r0, r1), _ = run_worker(tmp_path, tiny, 2, **kw)
    mb = lambda rows: tuple(sorted(map(tuple, rows)))  # a micro-batch, as its rows
    assert len(one['steps']) == len(r0['steps']) == len(r1['steps']) == STEPS
    assert all(len(s) == ACCUM for s in one['steps']) and all(len(s) == 1 for s in r0['steps'] + r1['steps'])
    sizes = {len(x) for s in one['steps'] for x in s}
    assert len(sizes) > 1, sizes  # micro-batches of several sizes: there is work to deal
    config = json.loads((Path(tiny)/'config.json').read_text())
    work = lambda rows: micro_batch_cost(len(rows), max(map(len, rows)), config)
    for k in range(STEPS):
        (a,), (b,) = r0['steps'][k], r1['steps'][k]
        assert sorted([mb(a), mb(b)]) == sorted(mb(x) for x in one['steps'][k]), f"step {k + 1}"
        assert work(a) >= work(b), f"step {k + 1}: rank 0 got the lighter micro-batch"
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r0['losses'], one['losses'])), (r0['losses'], one['losses'])
    same_adapter(out1, out2, atol=1e-5, rtol=1e-3)
    assert 'on CPU x 2 processes' in (out2/'finetune.log').read_text(encoding='utf-8')

    # resume at the start of the second epoch: the same micro-batches, the same adapter
    shutil.rmtree(out2/'checkpoint-3'); shutil.rmtree(out2/'adapter'); (out2/'train_stats.json').unlink()
    out3, (a0, a1), _ = run_worker(tmp_path, tiny, 2, again=True, **kw)
    assert 'resuming from checkpoint-2 (step 2/3)' in (out3/'finetune.log').read_text(encoding='utf-8')
    assert (mb(a0['steps'][0][0]), mb(a1['steps'][0][0])) == (mb(r0['steps'][2][0]), mb(r1['steps'][2][0]))
    same_adapter(out3, out2, atol=1e-6)


def test_two_machines_train_like_one(tmp_path, tiny):
    """`taide-ft run --nnodes 2 --node-rank R --master-addr HOST` on two machines: here two single-process "machines" on
    127.0.0.1 (gloo), started with the torchrun options `taide-ft run` gives each, train the adapter one process trains."""
    import socket
    from taide_ft.cli import torchrun_args
    out1, (one,), _ = run_worker(tmp_path, tiny, 1)
    ini = make_run(tmp_path/'nodes', tiny, batch=BATCH, accum=ACCUM, steps=STEPS, save=2, lr=1e-2)
    rec = tmp_path/'rec-nodes'; rec.mkdir()
    worker = tmp_path/'worker.py'; worker.write_text(WORKER)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = dict(os.environ, **MALLOC_ENV, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME='lo')
    opts = [torchrun_args(1, nnodes=2, node_rank=r, master_addr='127.0.0.1', master_port=port) for r in (0, 1)]
    assert opts[1] == ['--nnodes=2', '--node-rank=1', '--nproc-per-node=1', '--master-addr=127.0.0.1', f'--master-port={port}']
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *o, str(worker), str(ini), str(rec)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for o in opts]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    r0, r1 = [json.loads((rec/f'rank{r}.json').read_text()) for r in (0, 1)]
    assert (r0['plan_processes'], r1['plan_processes']) == (2, 2)
    for k in range(STEPS): assert sorted(rows_of(r0['steps'][k]) + rows_of(r1['steps'][k])) == rows_of(one['steps'][k]), f"step {k + 1}"
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r0['losses'], one['losses'])), (r0['losses'], one['losses'])
    same_adapter(out1, ini.parent/'out', atol=1e-5, rtol=1e-3)
    assert 'on CPU x 2 processes' in (ini.parent/'out'/'finetune.log').read_text(encoding='utf-8')


def test_several_machines_need_their_options():
    from taide_ft.cli import torchrun_args
    from taide_ft.config import ConfigError
    assert torchrun_args(2) == ['--standalone', '--nproc-per-node=2']
    with pytest.raises(ConfigError, match='give --master-addr'): torchrun_args(8, nnodes=2, node_rank=1)
    with pytest.raises(ConfigError, match=r'--node-rank 2: give 0 to 1 \(--nnodes 2\)'): torchrun_args(8, nnodes=2, node_rank=2, master_addr='10.0.0.1')
