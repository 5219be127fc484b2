"""[Training] REPORT_TO = tensorboard: a real tiny training and evaluation on the CPU write TensorBoard event files that hold
the trainer's loss and learning rate and taide_ft's own figures (tokens a second, eval loss at step 0 and at the end, the
evaluation's scores before and after), read back with TensorBoard's own reader."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from test_training import MALLOC_ENV, ROWS, make_run, tiny  # noqa: F401  (tiny is a fixture)

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip('tensorboard')

# `fine_tune`'s stages up to the evaluation (the export has its own tests)
SCRIPT = """import sys
from taide_ft.config import load_config
from taide_ft.dataset import build_dataset
from taide_ft.evaluate import evaluate
from taide_ft.model import add_lora, load_model
from taide_ft.pipeline import start
from taide_ft.training import train
cfg = load_config(sys.argv[1])
plan = start(cfg)
model, tok = load_model(cfg, plan)
data = build_dataset(cfg, tok)
model = add_lora(model, cfg, plan)
stats = train(cfg, plan, model, tok, data)
evaluate(cfg, plan, model, tok, data, stats)
"""


def scalars(logdir):
    "{tag: [(step, value), ...]} of every event file under `logdir`."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for events in sorted(Path(logdir).rglob('events.out.tfevents.*')):
        acc = EventAccumulator(str(events), size_guidance={'scalars': 0}); acc.Reload()
        for tag in acc.Tags()['scalars']: out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_gets_the_loss_and_taide_ft_figures(tmp_path, tiny):
    ini = make_run(tmp_path/'run', tiny, steps=4, save=0, batch=2, eval_split=0.25)
    with open(ini, 'a', encoding='utf-8') as f: f.write("REPORT_TO = tensorboard\n")
    (tmp_path/'stages.py').write_text(SCRIPT)
    env = dict(os.environ, **MALLOC_ENV, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(tmp_path/'stages.py'), str(ini)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = ini.parent/'out'
    s = scalars(out/'runs')
    stats = json.loads((out/'train_stats.json').read_text())
    report = json.loads((out/'eval_report.json').read_text())
    # the trainer's figures, at every step
    assert [st for st, _ in s['train/loss']] == [1, 2, 3, 4]
    hist = [h for h in stats['log_history'] if 'loss' in h]
    assert [round(v, 4) for _, v in s['train/loss']] == [round(h['loss'], 4) for h in hist]
    lr = [v for _, v in s['train/learning_rate']]
    assert len(lr) == 4 and all(0 <= v <= 1e-2 * 1.0001 for v in lr) and max(lr) > 0, lr  # LEARNING_RATE = 1e-2
    # real tokens a second, beside each loss; the same figure as the log line's
    tps = dict(s['train/tokens_per_s'])
    assert sorted(tps) == [1, 2, 3, 4] and all(v > 0 for v in tps.values()), tps
    assert [round(h['tokens_per_s'], 1) for h in hist] == [round(tps[h['step']], 1) for h in hist]
    log = (out/'finetune.log').read_text(encoding='utf-8')
    assert f"| {tps[4]:,.0f} tok/s |" in log
    # the eval loss before the first step and at the end
    ev = dict(s['eval/loss'])
    assert sorted(ev) == [0, 4] and abs(ev[0] - stats['first_eval_loss']) < 1e-4 and abs(ev[4] - stats['eval_loss']) < 1e-4
    assert ev[4] < ev[0]  # the tiny model learned its rows
    # the run's figures at its end, and the evaluation's scores: the base model's at step 0, the tuned one's at the end
    assert dict(s['train/steady_tokens_per_s'])[4] == pytest.approx(stats['steady_tokens_per_s'], rel=1e-3)
    assert dict(s['train/peak_memory_gib'])[4] == pytest.approx(stats['peak_mem_gib'], rel=1e-3)
    for k in ('chrf', 'exact', 'chars', 'stopped'):
        got = dict(s[f'eval/{k}'])
        assert sorted(got) == [0, 4], (k, got)
        assert got[0] == pytest.approx(report['before'][k], abs=1e-3) and got[4] == pytest.approx(report['after'][k], abs=1e-3), (k, got)
    assert 0 <= dict(s['eval/chrf'])[4] <= 100
