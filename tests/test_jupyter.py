"""`make lab` works: a real Jupyter server started on 127.0.0.1 (a free port, a token) lists nbs/ through its REST API
and sees the notebooks, then stops; within 60 s."""
import json, os, secrets, socket, subprocess, sys, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_jupyter_server_lists_the_notebooks(tmp_path):
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path/'config'), JUPYTER_RUNTIME_DIR=str(tmp_path/'runtime'), JUPYTER_DATA_DIR=str(tmp_path/'data'))
    server = subprocess.Popen([sys.executable, '-m', 'jupyter_server', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
                               '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}', '--allow-root'],
                              stdout=open(tmp_path/'server.log', 'w'), stderr=subprocess.STDOUT, env=env)
    url = f'http://127.0.0.1:{port}/api/contents/nbs'
    try:
        deadline, listing = time.time() + 60, None
        while time.time() < deadline and listing is None:
            assert server.poll() is None, (tmp_path/'server.log').read_text()[-3000:]
            try:
                req = urllib.request.Request(url, headers={'Authorization': f'token {token}'})
                with urllib.request.urlopen(req, timeout=5) as r: listing = json.load(r)
            except OSError: time.sleep(0.5)
        assert listing is not None, 'the server did not answer within 60 s'
        names = {c['name'] for c in listing['content'] if c['type'] == 'notebook'}
        assert {'00_config.ipynb', '99_pipeline.ipynb'} <= names and names == {p.name for p in (ROOT/'nbs').glob('*.ipynb')}, names
        try: urllib.request.urlopen(url, timeout=5); refused = False  # without the token: refused
        except urllib.error.HTTPError as e: refused = e.code == 403
        assert refused
    finally:
        server.terminate()
        try: server.wait(timeout=15)
        except subprocess.TimeoutExpired: server.kill(); server.wait()
    assert server.returncode is not None
