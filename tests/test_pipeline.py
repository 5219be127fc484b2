"The pipeline notebook end to end through papermill, and `taide-ft run` / `export` from a terminal (its errors too), on a tiny Llama with the real Llama 3 tokenizer."
import json, os, re, subprocess, sys
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


def cell_text(cell):
    "What a cell printed or displayed."
    return ''.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', '')) for o in cell.get('outputs', []))


def test_executed_notebook_has_no_errors(run):
    _, out, outputs = run
    nb = json.loads(out.read_text())
    assert not [o for c in nb['cells'] for o in c.get('outputs', []) if o.get('output_type') == 'error']
    injected = [c for c in nb['cells'] if 'injected-parameters' in c['metadata'].get('tags', [])]
    assert len(injected) == 1 and 'MAX_STEPS = 3' in ''.join(injected[0]['source'])
    # the environment cell makes the plan once and shows it; the later stages take it
    (env,) = [c for c in nb['cells'] if ''.join(c['source']).splitlines()[-2:] == ['plan = start(cfg)', 'plan']]
    shown = cell_text(env)
    assert 'backend       transformers' in shown and 'a step        2 rows; micro-batches sorted' in shown, shown
    code = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code')
    assert all(f in code for f in ('load_model(cfg, plan)', 'add_lora(model, cfg, plan)', 'train(cfg, plan, model, tok, data)'))
    log = (outputs/'finetune.log').read_text()
    assert 'Configuration (' in log and 'Environment\n' in log and re.search(r'^a step +2 rows', log, re.M)  # start(cfg) logged both


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


def test_hub_upload_takes_the_finished_run(run):
    "What PUSH_TO_HUB would upload from a real finished run: the adapter, the GGUF, the Modelfile, the model card, manifest."
    from taide_ft.config import load_config
    from taide_ft.pipeline import hub_files, hub_repo, hub_upload_command
    d, _, outputs = run
    cfg = load_config(d/'config.ini', push_to_hub=True)
    files = hub_files(cfg)
    assert 'adapter/adapter_config.json' in files and 'adapter/adapter_model.safetensors' in files, files
    assert [f for f in files if f.endswith('.gguf')] == [p.name for p in outputs.glob('*.gguf')] and 'tiny-taide-q4_k_m.gguf' in files, files
    assert {'Modelfile', 'README.md', 'manifest.json'} <= set(files) and not any(f.startswith('checkpoint') for f in files), files
    assert all((outputs/f).is_file() for f in files) and hub_repo(cfg, 'someone') == 'test/tiny-taide'
    assert hub_upload_command(cfg).startswith(f"hf upload test/tiny-taide {outputs} . ") and hub_upload_command(cfg).endswith('--private')


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


def config_cell_error(tmp_path, *params):
    "Run the pipeline notebook with papermill `params`; the one error it stops with: (its class, its text), asserting it is in the config cell."
    out = tmp_path/'bad.ipynb'
    r = subprocess.run([sys.executable, '-m', 'papermill', str(NB), str(out), '--cwd', str(ROOT/'nbs'), *params],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    nb = json.loads(out.read_text())
    errs = [(i, o) for i, c in enumerate(nb['cells']) for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert len(errs) == 1
    i, err = errs[0]
    assert 'cfg = load_config' in ''.join(nb['cells'][i]['source'])
    return err['ename'], '\n'.join(err['traceback'])


def test_bad_parameter_fails_first_with_the_config_message(tmp_path):
    _, text = config_cell_error(tmp_path, '-p', 'R', 'sixteen', '-p', 'MAX_STEPS', '0')
    assert "[LoRA] R = 'sixteen' (papermill): must be a whole number ≥ 1" in text
    assert "[Training] MAX_STEPS = 0 (papermill): must be ≥ 1" in text
    assert 'Traceback' not in text


def test_unknown_parameter_fails_in_the_config_cell(tmp_path):
    "A mistyped `-p` is not ignored: the config cell stops with a ConfigError naming it (papermill only warns)."
    ename, text = config_cell_error(tmp_path, '-p', 'NO_SUCH_PARAM', '1', '-p', 'MAX_STEP', '3')
    assert ename == 'ConfigError'
    assert text.startswith('ConfigError: papermill: 2 problems:') and 'Traceback' not in text
    assert 'papermill: unknown parameter `NO_SUCH_PARAM`. Parameters are CONFIG and the keys of config.ini' in text
    assert 'papermill: unknown parameter `MAX_STEP` (did you mean `MAX_STEPS`?)' in text


def tiny_project(d, rows=8, config="", hidden_size=256):
    "A tiny Llama, `rows` training rows and a config.ini in `d`; returns the config path."
    from taide_ft.fixtures import tiny_llama
    tiny_llama(d/'tiny', hidden_size=hidden_size, num_hidden_layers=2)
    data = [{"instruction": f"第 {i} 題：台灣最長的河流是哪一條？", "output": "台灣最長的河流是濁水溪。"} for i in range(rows)]
    (d/'train_data.jsonl').write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in data), encoding='utf-8')
    (d/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = tiny\nNEW_MODEL_NAME = test/cli\nMAX_SEQ_LENGTH = 128\n" + config, encoding='utf-8')
    return d/'config.ini'


def taide_ft(*args, **kw):
    return subprocess.run([sys.executable, '-m', 'taide_ft', *map(str, args)], capture_output=True, text=True, **kw)


def test_cli_run_without_the_base_model(tmp_path):
    "A BASE_MODEL_NAME that is not there: `ConfigError` and what to give instead, exit 2, the same in finetune.log, no traceback."
    ini = tmp_path/'config.ini'
    (tmp_path/'train_data.jsonl').write_text('{"instruction": "q", "output": "a"}\n', encoding='utf-8')
    ini.write_text("[Model]\nBASE_MODEL_NAME = ./no-such-model\n", encoding='utf-8')
    r = taide_ft('run', '--config', ini, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    msg = (f"ConfigError: {ini}: 1 problem:\n  - [Model] BASE_MODEL_NAME: `{tmp_path/'no-such-model'}` does not exist. "
           "Give a hub id, a model folder or a .gguf file.")
    assert msg in r.stdout and 'Traceback' not in out, out
    log = (tmp_path/'outputs'/'finetune.log').read_text(encoding='utf-8')
    assert re.search(r'^\S+ \S+ ERROR   ' + re.escape(msg), log, re.M), log[-2000:]
    assert not (tmp_path/'outputs'/'adapter').exists()


def test_cli_export_without_an_adapter(tmp_path):
    "`taide-ft export` before any run: says there is no adapter and how to make one, exit 2, no traceback."
    ini = tiny_project(tmp_path, hidden_size=64)
    r = taide_ft('export', '--config', ini, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    msg = f"ConfigError: {ini}: 1 problem:\n  - no trained adapter in {tmp_path/'outputs'/'adapter'}: run `taide-ft run --config {ini}` first"
    assert msg in r.stdout and 'Traceback' not in out, out
    assert msg in (tmp_path/'outputs'/'finetune.log').read_text(encoding='utf-8')
    assert not list((tmp_path/'outputs').glob('*.gguf'))


def test_cli_run_with_bad_data(tmp_path):
    "Bad training data in `taide-ft run`: the rows' problems, exit 1, in finetune.log, no traceback."
    ini = tiny_project(tmp_path, hidden_size=64)
    with open(tmp_path/'train_data.jsonl', 'a', encoding='utf-8') as f: f.write('{"instruction": "q"}\n')
    r = taide_ft('run', '--config', ini, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and 'Traceback' not in out, out
    assert 'DataError: 1 bad row:\n  - train_data.jsonl line 9: missing `output`\nFix these rows' in r.stdout, out
    assert 'train_data.jsonl line 9: missing `output`' in (tmp_path/'outputs'/'finetune.log').read_text(encoding='utf-8')


def test_cli_run_does_the_same_stages(tmp_path):
    "`taide-ft run` trains, exports, verifies and chats, with the same log and files as the notebook."
    ini = tiny_project(tmp_path)
    r = taide_ft('run', '--config', ini, '--set', 'Training.MAX_STEPS=2', '--set', 'Training.WARMUP_STEPS=0', '--set', 'Training.SAVE_STEPS=0',
                 '--set', 'Training.GRADIENT_ACCUMULATION_STEPS=1', timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path/'outputs'
    log = (out/'finetune.log').read_text()
    assert 'step 2/2' in log and 'Chat with cli-q4_k_m.gguf' in log and 'ollama create test/cli -f Modelfile' in log
    stages = ['Configuration (', 'Environment\n', 'loaded ', 'dataset: 8 train rows', 'LoRA r=16', 'training with transformers on CPU, float32: 2 steps x 2 rows',
              'training done:', 'convert: started', 'verify: ', 'export: done', 'Chat with ', 'Run it in Ollama']
    at = [log.find(x) for x in stages]
    assert -1 not in at and at == sorted(at), dict(zip(stages, at))  # fine_tune's stages, in order
    assert (out/'cli-q4_k_m.gguf').is_file() and (out/'Modelfile').is_file()
    assert all(v['passed'] for v in json.loads((out/'manifest.json').read_text())['verification'].values())


def test_cli_run_on_two_processes(tmp_path):
    """`torchrun --nproc-per-node 2 -m taide_ft run` (gloo on CPU): both processes train, one step is the batch of one
    process, and rank 0 alone logs and exports."""
    ini = tiny_project(tmp_path)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', '-m', 'taide_ft', 'run',
                        '--config', str(ini), '--set', 'Training.MAX_STEPS=2', '--set', 'Training.WARMUP_STEPS=0',
                        '--set', 'Training.SAVE_STEPS=0', '--set', 'Training.GRADIENT_ACCUMULATION_STEPS=2'],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path/'outputs'
    log = (out/'finetune.log').read_text()
    # a step is 2 x 2 rows, as on one process, dealt between the two
    assert re.search(r'^processes +2$', log, re.M) and 'training with transformers on CPU x 2 processes, float32: 2 steps x 4 rows = 1.00 epochs of 8 rows' in log, log[-3000:]
    assert log.count('step 2/2 | loss') == 1 and '[rank 1]' not in log
    assert log.count('Chat with cli-q4_k_m.gguf') == 1 and (out/'cli-q4_k_m.gguf').is_file()  # rank 0 alone exports
    stats = json.loads((out/'train_stats.json').read_text())
    assert stats['processes'] == 2 and stats['steps'] == 2 and stats['rows_per_step'] == 4
    assert all(v['passed'] for v in json.loads((out/'manifest.json').read_text())['verification'].values())


def test_after_a_run_eval_chat_and_export(tmp_path):
    """What users do after `taide-ft run`, on its outputs: `eval` measures the evaluation again (the same eval loss the
    run measured, answers before and after, the GGUF's), `chat` answers from the tuned adapter and from the GGUF and
    leaves on /exit, `export` writes another type; without an adapter `eval` and `chat` say to run `taide-ft run` first."""
    ini = tiny_project(tmp_path, rows=12, config="[Dataset]\nEVAL_SPLIT = 0.25\n")
    for cmd in ('eval', 'chat'):
        r = taide_ft(cmd, '--config', ini, timeout=300)
        assert r.returncode == 2 and 'no trained adapter in' in r.stdout and 'taide-ft run --config' in r.stdout and 'Traceback' not in r.stderr, r.stdout + r.stderr
    r = taide_ft('run', '--config', ini, '--set', 'Training.MAX_STEPS=2', '--set', 'Training.WARMUP_STEPS=0', '--set', 'Training.SAVE_STEPS=0',
                 '--set', 'Training.GRADIENT_ACCUMULATION_STEPS=1', timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path/'outputs'
    first = json.loads((out/'eval_report.json').read_text())
    assert len(first['rows']) == 3 and first['gguf']['file'] == 'cli-q4_k_m.gguf' and (out/'eval.md').is_file()
    card = (out/'README.md').read_text()
    assert '## Evaluation' in card and 'ollama create test/cli -f Modelfile' in card and 'licence' in card
    (out/'eval_report.json').unlink()
    r = taide_ft('eval', '--config', ini, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    again = json.loads((out/'eval_report.json').read_text())
    assert abs(again['eval_loss']['after'] - first['eval_loss']['after']) < 1e-4 * abs(first['eval_loss']['after'])  # the adapter as trained
    assert [x['after'] for x in again['rows']] == [x['after'] for x in first['rows']] and again['gguf']['file'] == 'cli-q4_k_m.gguf'
    for args in ([], ['--gguf', out/'cli-q4_k_m.gguf']):
        r = subprocess.run([sys.executable, '-m', 'taide_ft', 'chat', '--config', str(ini), *map(str, args)], input='台灣最長的河流？\n/exit\nnot read\n',
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert r.stdout.count('> ') == 2 and 'not read' not in r.stdout, r.stdout  # one answer, then /exit leaves
    r = taide_ft('export', '--config', ini, '--set', 'Quantization.QUANTIZATION_METHOD=q8_0', timeout=900)
    assert r.returncode == 0 and (out/'cli-q8_0.gguf').is_file(), (r.stdout + r.stderr)[-3000:]
    assert 'FROM ./cli-q8_0.gguf' in (out/'Modelfile').read_text()
