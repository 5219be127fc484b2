"""PUSH_TO_HUB without a reachable hub: `check` says so before anything runs, and `taide-ft push` on a finished run ends
with a HubError that names the way to upload later, quickly, in the terminal and in finetune.log. HF_ENDPOINT points at a
closed port on 127.0.0.1, so nothing leaves the machine."""
import os, socket, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def closed_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def cli(*args, cwd, **env):
    t = time.time()
    r = subprocess.run([sys.executable, '-m', 'taide_ft', *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=f'http://127.0.0.1:{closed_port()}', HF_TOKEN='hf_test', **env))
    return r, time.time() - t


def finished_run(tmp_path):
    from taide_ft.fixtures import tiny_llama
    tiny_llama(tmp_path/'tiny')
    (tmp_path/'train_data.jsonl').write_text(''.join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(20)), encoding='utf-8')
    (tmp_path/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = tiny\nNEW_MODEL_NAME = me/tiny-taide\nMAX_SEQ_LENGTH = 256\nPUSH_TO_HUB = true\n"
                                       "[Training]\nMAX_STEPS = 10\n", encoding='utf-8')
    return tmp_path/'config.ini'


def test_check_asks_the_hub_first(tmp_path):
    ini = finished_run(tmp_path)
    r, seconds = cli('check', '--config', str(ini), cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert 'ERROR: [Model] PUSH_TO_HUB = true (NEW_MODEL_NAME = me/tiny-taide): cannot reach the hub at http://127.0.0.1:' in r.stdout, out
    assert 'upload later with `taide-ft push --config' in r.stdout and 'OK: the run can start.' not in out and 'Traceback' not in out
    assert 'cannot reach the hub' in (tmp_path/'outputs'/'finetune.log').read_text(encoding='utf-8')
    r, _ = cli('check', '--config', str(ini), '--set', 'Model.PUSH_TO_HUB=false', cwd=tmp_path)
    assert r.returncode == 0 and 'OK: the run can start.' in r.stdout and 'cannot reach' not in r.stdout, r.stdout[-2000:] + r.stderr
    r, _ = cli('check', '--config', str(ini), cwd=tmp_path, HF_HUB_OFFLINE='1')
    assert r.returncode == 1 and 'HF_HUB_OFFLINE is set, so the hub is not asked' in r.stdout, r.stdout + r.stderr


def test_push_offline_says_how_to_upload_later(tmp_path):
    ini = finished_run(tmp_path)
    r, _ = cli('push', '--config', str(ini), cwd=tmp_path)
    assert r.returncode == 1 and 'is not a finished run (adapter/adapter_config.json, Modelfile, README.md, a .gguf file missing)' in r.stdout, r.stdout + r.stderr
    out = tmp_path/'outputs'
    for f in ('adapter/adapter_config.json', 'adapter/adapter_model.safetensors', 'tiny-taide-q4_k_m.gguf', 'Modelfile', 'README.md'):
        (out/f).parent.mkdir(parents=True, exist_ok=True); (out/f).write_text('x')
    r, seconds = cli('push', '--config', str(ini), cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert seconds < 60, seconds  # a closed port refuses at once: no retries for minutes
    msg = next(l for l in r.stdout.splitlines() if l.startswith('HubError: '))
    assert f"the upload of {out} to the hub as `me/tiny-taide` failed: cannot reach the hub at http://127.0.0.1:" in msg, msg
    assert f"upload them later with `taide-ft push --config {ini}`, or `hf upload me/tiny-taide {out} . --include \"adapter/*\" --include \"*.gguf\"" in msg, msg
    assert msg.endswith(' --private`.') and 'Traceback' not in r.stdout + r.stderr
    assert msg in (out/'finetune.log').read_text(encoding='utf-8')
    assert sorted(p.name for p in out.rglob('*') if p.is_file()) == sorted(['adapter_config.json', 'adapter_model.safetensors', 'tiny-taide-q4_k_m.gguf', 'Modelfile', 'README.md', 'finetune.log'])


def test_check_without_the_hub_names_the_download_quickly(tmp_path):
    "A hub model, a hub that does not answer and an empty cache: check says how to download it, within seconds."
    (tmp_path/'train_data.jsonl').write_text(''.join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(20)), encoding='utf-8')
    (tmp_path/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = taide/Llama-3.1-TAIDE-LX-8B-Chat\n", encoding='utf-8')
    r, seconds = cli('check', '--config', str(tmp_path/'config.ini'), cwd=tmp_path, HF_HOME=str(tmp_path/'hf'))
    assert r.returncode == 1 and seconds < 15, (seconds, r.stdout[-2000:])  # the hub client alone retries for 23 s
    assert ("ERROR: [Model] BASE_MODEL_NAME = taide/Llama-3.1-TAIDE-LX-8B-Chat: cannot reach the hub and the model is not cached. "
            "Download it where there is network (`hf download taide/Llama-3.1-TAIDE-LX-8B-Chat --local-dir <folder>`") in r.stdout, r.stdout[-2000:]
