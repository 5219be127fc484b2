"The pipeline notebook end to end through papermill, on a tiny Llama with the real Llama 3 tokenizer."
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/'nbs'/'99_pipeline.ipynb'


def test_help_notebook_lists_every_parameter():
    from taide_ft.config import KEYS
    r = subprocess.run([sys.executable, '-m', 'papermill', '--help-notebook', str(NB)], capture_output=True, text=True, check=True)
    for k in KEYS:
        i = next((i for i, l in enumerate(r.stdout.splitlines()) if l.strip().startswith(k.name + ':')), None)
        assert i is not None, f"{k.name} missing from --help-notebook"
        line, after = (r.stdout.splitlines() + [''])[i:i+2]
        assert any(f": {t} (default None)" in line for t in ('int', 'float', 'bool', 'str')), line
        assert 'default' in line + after, (line, after)
    assert 'CONFIG:' in r.stdout


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "Run the pipeline notebook once with papermill on a tiny model; return (folder, executed notebook, outputs)."
    from taide_ft.fixtures import tiny_llama
    d = tmp_path_factory.mktemp('pipeline')
    tiny_llama(d/'tiny', hidden_size=256, num_hidden_layers=2)
    rows = [{"instruction": f"第 {i} 題：台灣最高的山是哪一座？", "input": "玉山主峰海拔約 3,952 公尺。" if i % 2 else "",
             "output": "台灣最高的山是玉山，主峰海拔約 3,952 公尺。"} for i in range(12)]
    (d/'train_data.jsonl').write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8')
    (d/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = tiny\nNEW_MODEL_NAME = test/tiny-taide\nMAX_SEQ_LENGTH = 256\n", encoding='utf-8')
    out = d/'executed.ipynb'
    r = subprocess.run([sys.executable, '-m', 'papermill', str(NB), str(out), '--cwd', str(ROOT/'nbs'),
                        '-p', 'CONFIG', str(d/'config.ini'), '-p', 'MAX_STEPS', '3', '-p', 'WARMUP_STEPS', '1',
                        '-p', 'PER_DEVICE_TRAIN_BATCH_SIZE', '2', '-p', 'GRADIENT_ACCUMULATION_STEPS', '1',
                        '-p', 'SAVE_STEPS', '0', '-p', 'QUANTIZATION_METHOD', 'q4_k_m'],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return d, out, d/'outputs'


def test_executed_notebook_has_no_errors(run):
    _, out, _ = run
    nb = json.loads(out.read_text())
    assert not [o for c in nb['cells'] for o in c.get('outputs', []) if o.get('output_type') == 'error']
    injected = [c for c in nb['cells'] if 'injected-parameters' in c['metadata'].get('tags', [])]
    assert len(injected) == 1 and 'MAX_STEPS = 3' in ''.join(injected[0]['source'])


def test_outputs_manifest_gguf_modelfile(run):
    _, _, outputs = run
    manifest = json.loads((outputs/'manifest.json').read_text())
    ggufs = sorted(outputs.glob('*.gguf'))
    assert [p.name for p in ggufs if 'q4_k_m' in p.name], ggufs
    names = {f['name'] for f in manifest['files']}
    assert 'Modelfile' in names and any(n.endswith('q4_k_m.gguf') for n in names)
    mf = (outputs/'Modelfile').read_text().splitlines()
    frm = [l for l in mf if l.startswith('FROM ')]
    assert len(frm) == 1 and (outputs/frm[0].split()[1]).is_file(), frm
    assert 'PARAMETER stop "<|eot_id|>"' in mf and 'PARAMETER num_ctx 256' in mf
    stats = json.loads((outputs/'train_stats.json').read_text())
    assert stats['steps'] == 3
    assert 'step 3/3' in (outputs/'finetune.log').read_text()


def test_gguf_loads_in_llama_cpp_and_verification_passed(run):
    _, _, outputs = run
    report = json.loads((outputs/'export_report.json').read_text())
    assert report['results'] and all(r['passed'] for r in report['results'].values())
    assert report['results']['q4_k_m']['top1_agreement'] >= 0.6
    from llama_cpp import Llama
    q4 = next(outputs.glob('*q4_k_m.gguf'))
    llm = Llama(model_path=str(q4), n_ctx=64, verbose=False)
    assert llm.n_vocab() == 128256
    assert len(llm.tokenize('台灣'.encode())) > 0


def test_bad_parameter_fails_first_with_the_config_message(tmp_path):
    out = tmp_path/'bad.ipynb'
    r = subprocess.run([sys.executable, '-m', 'papermill', str(NB), str(out), '--cwd', str(ROOT/'nbs'),
                        '-p', 'R', 'sixteen', '-p', 'MAX_STEPS', '0'], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    nb = json.loads(out.read_text())
    errs = [(i, o) for i, c in enumerate(nb['cells']) for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert len(errs) == 1
    i, err = errs[0]
    assert 'cfg = load_config' in ''.join(nb['cells'][i]['source'])
    text = '\n'.join(err['traceback'])
    assert "[LoRA] R = 'sixteen' (papermill): must be a whole number ≥ 1" in text
    assert "[Training] MAX_STEPS = 0 (papermill): must be ≥ 1" in text
    assert 'Traceback' not in text


def test_cli_run_does_the_same_stages(tmp_path):
    "`taide-ft run` trains, exports, verifies and chats, with the same log and files as the notebook."
    from taide_ft.fixtures import tiny_llama
    tiny_llama(tmp_path/'tiny', hidden_size=256, num_hidden_layers=2)
    rows = [{"instruction": f"第 {i} 題：台灣最長的河流是哪一條？", "output": "台灣最長的河流是濁水溪。"} for i in range(8)]
    (tmp_path/'train_data.jsonl').write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8')
    (tmp_path/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = tiny\nNEW_MODEL_NAME = test/cli\nMAX_SEQ_LENGTH = 128\n", encoding='utf-8')
    r = subprocess.run([sys.executable, '-m', 'taide_ft', 'run', '--config', str(tmp_path/'config.ini'),
                        '--set', 'Training.MAX_STEPS=2', '--set', 'Training.WARMUP_STEPS=0', '--set', 'Training.SAVE_STEPS=0',
                        '--set', 'Training.GRADIENT_ACCUMULATION_STEPS=1'], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path/'outputs'
    log = (out/'finetune.log').read_text()
    assert 'step 2/2' in log and 'Chat with cli-q4_k_m.gguf' in log and 'ollama create test/cli -f Modelfile' in log
    assert (out/'cli-q4_k_m.gguf').is_file() and (out/'Modelfile').is_file()
    assert all(v['passed'] for v in json.loads((out/'manifest.json').read_text())['verification'].values())


def test_cli_run_on_two_processes(tmp_path):
    """`torchrun --nproc-per-node 2 -m taide_ft run` (gloo on CPU): both processes train, one step is the batch of one
    process, and rank 0 alone logs and exports."""
    from taide_ft.fixtures import tiny_llama
    tiny_llama(tmp_path/'tiny', hidden_size=256, num_hidden_layers=2)
    rows = [{"instruction": f"第 {i} 題：台灣最長的河流是哪一條？", "output": "台灣最長的河流是濁水溪。"} for i in range(8)]
    (tmp_path/'train_data.jsonl').write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8')
    (tmp_path/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = tiny\nNEW_MODEL_NAME = test/cli\nMAX_SEQ_LENGTH = 128\n", encoding='utf-8')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', '-m', 'taide_ft', 'run',
                        '--config', str(tmp_path/'config.ini'), '--set', 'Training.MAX_STEPS=2', '--set', 'Training.WARMUP_STEPS=0',
                        '--set', 'Training.SAVE_STEPS=0', '--set', 'Training.GRADIENT_ACCUMULATION_STEPS=2'],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path/'outputs'
    log = (out/'finetune.log').read_text()
    assert '2 processes: each takes 2 x 1 rows a step' in log and log.count('step 2/2 | loss') == 1 and '[rank 1]' not in log
    assert 'Chat with cli-q4_k_m.gguf' in log and (out/'cli-q4_k_m.gguf').is_file()
    stats = json.loads((out/'train_stats.json').read_text())
    assert stats['processes'] == 2 and stats['steps'] == 2
    assert all(v['passed'] for v in json.loads((out/'manifest.json').read_text())['verification'].values())
