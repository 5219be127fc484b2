"Every data format `load_rows` reads, from real files: the rows it gives, and the message for one bad row of each."
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

from taide_ft.config import ConfigError, load_config
from taide_ft.dataset import DataError, build_dataset, check_data, format_messages, load_rows
from taide_ft.fixtures import llama3_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
GOOD = [{'instruction': '台灣最高的山？', 'input': '', 'output': '玉山。'},
        {'instruction': '一年可以休幾天特休？', 'input': '年資滿三年者 14 天。', 'output': '14 天。'}]
BAD = {'instruction': '第三題', 'input': '', 'output': ''}


def problems(path, **kw):
    with pytest.raises(DataError) as e: load_rows(path, **kw)
    return e.value.problems


def cfg_for(tmp_path, data, **kw):
    return load_config(None, check_files=False, dataset_file=data, output_dir=tmp_path/'out', eval_split=0.0, **kw)


def test_sharegpt_jsonl_and_json_array(tmp_path):
    conv = lambda *turns: {'conversations': [{'from': f, 'value': v} for f, v in turns]}
    rows = [conv(('system', '你是客服。'), ('human', '可以退貨嗎？'), ('gpt', '七天內可以。')),
            conv(('user', '營業時間？'), ('assistant', '九點到六點。')),
            conv(('human', '運費？'), ('gpt', 7))]
    p = write_jsonl(tmp_path/'chat.jsonl', rows)
    assert problems(p) == ['chat.jsonl line 3: turn 2: `value` is a number, not a string']
    got = load_rows(p, skip_bad_rows=True)
    assert (got.format, got.shape, [r.line for r in got]) == ('jsonl', 'sharegpt', [1, 2])
    assert format_messages(got[0], 'other') == [{'role': 'system', 'content': '你是客服。'}, {'role': 'user', 'content': '可以退貨嗎？'},
                                                {'role': 'assistant', 'content': '七天內可以。'}]
    assert format_messages(got[1], '')[1] == {'role': 'assistant', 'content': '九點到六點。'}
    a = tmp_path/'chat.json'
    a.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding='utf-8')
    starts = [i for i, l in enumerate(a.read_text(encoding='utf-8').split('\n'), 1) if l == '  {']  # where each row opens
    assert problems(a) == [f'chat.json row 3 (line {starts[2]}): turn 2: `value` is a number, not a string']
    assert [r.data for r in load_rows(a, skip_bad_rows=True)] == [r.data for r in got]
    a.write_text('[{"instruction": "q", "output": "a"},\n {"instruction": "q", "output": }]', encoding='utf-8')
    assert problems(a) == ['chat.json line 2: invalid JSON (Expecting value at column 33); the whole file is one JSON array, so fix this first.']


def test_csv_and_tsv(tmp_path):
    p = tmp_path/'faq.csv'
    p.write_text('instruction,input,output\n' + ''.join(f'{r["instruction"]},{r["input"]},{r["output"]}\n' for r in GOOD + [BAD]), encoding='utf-8')
    assert problems(p) == ['faq.csv row 4: `output` is empty']
    got = load_rows(p, skip_bad_rows=True)
    assert [r.data for r in got] == GOOD and [r.line for r in got] == [2, 3] and got.format == 'csv'
    assert got.rejected == [{'file': 'faq.csv', 'line': 4, 'problem': 'faq.csv row 4: `output` is empty', 'text': '["第三題", "", ""]'}]
    t = tmp_path/'faq.tsv'
    t.write_text('instruction\toutput\n台灣最高的山？\t玉山。\n多一欄\t答\t多\n', encoding='utf-8')
    assert problems(t) == ['faq.tsv row 3: 3 fields where the header has 2; put a field that holds a tab or a line break in double quotes']
    assert load_rows(t, skip_bad_rows=True).format == 'tsv'
    n = tmp_path/'noheader.csv'
    n.write_text('台灣最高的山？,,玉山。\n', encoding='utf-8')
    assert 'row 1 (the header) has no `instruction` and no `output` column' in problems(n)[0]


def test_parquet(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    p = tmp_path/'faq.parquet'
    pq.write_table(pa.Table.from_pylist(GOOD + [BAD]), p)
    assert problems(p) == ['faq.parquet row 3 (index 2): `output` is empty']
    got = load_rows(p, skip_bad_rows=True)
    assert [r.data for r in got] == GOOD and got.format == 'parquet'
    q = tmp_path/'other.parquet'
    pq.write_table(pa.Table.from_pylist([{'question': 'q', 'answer': 'a'}] * 50), q)
    assert len(problems(q)) == 1  # once for the file, not once a row
    assert 'has no `instruction` and no `output` column (its columns: question, answer)' in problems(q)[0]


def test_folder_of_two_formats(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    f = tmp_path/'data'; f.mkdir()
    pq.write_table(pa.Table.from_pylist(GOOD), f/'b.parquet')
    write_jsonl(f/'a.jsonl', [GOOD[0], BAD])
    assert problems(f) == ['a.jsonl line 2: `output` is empty']
    cfg = cfg_for(tmp_path, f, skip_bad_rows=True)
    st = check_data(cfg)
    assert (st['format'], st['shape'], st['rows'], st['bad_rows']) == ('folder (jsonl, parquet)', 'instruction', 3, 1)
    rej = [json.loads(l) for l in (tmp_path/'out'/'rejected.jsonl').read_text(encoding='utf-8').splitlines()]
    assert [(r['file'], r['line']) for r in rej] == [('a.jsonl', 2)]
    rows = load_rows(f, skip_bad_rows=True)
    assert [(r.file, r.line) for r in rows] == [('a.jsonl', 1), ('b.parquet', 1), ('b.parquet', 2)]


def test_datasets_folder_trains_and_evaluates(tmp_path):
    import datasets
    datasets.DatasetDict({'train': datasets.Dataset.from_list(GOOD * 4), 'validation': datasets.Dataset.from_list(GOOD + [BAD])}
                         ).save_to_disk(str(tmp_path/'ds'))
    cfg = cfg_for(tmp_path, tmp_path/'ds', eval_file=tmp_path/'ds')
    with pytest.raises(DataError, match=r'ds:validation row 3 \(index 2\): `output` is empty'): check_data(cfg)
    cfg.data.skip_bad_rows = True
    st = check_data(cfg)
    assert (st['format'], st['eval_format'], st['rows'], st['eval_rows'], st['bad_rows']) == ('hf', 'hf', 8, 2, 1)
    d = build_dataset(cfg, llama3_tokenizer())
    assert (d.stats['rows'], d.stats['eval_rows'], d.stats['format']) == (8, 2, 'hf')


def test_config_file_with_dataset_format(tmp_path):
    (tmp_path/'rows.txt').write_text('instruction,output\nq,a\n', encoding='utf-8')
    ini = tmp_path/'config.ini'
    ini.write_text('[Dataset]\nDATASET_FILE = rows.txt\nDATASET_FORMAT = csv\n', encoding='utf-8')
    cfg = load_config(ini)
    assert (cfg.data.dataset_format, check_data(cfg)['format']) == ('csv', 'csv')
    with pytest.raises(ConfigError, match="DATASET_FORMAT = 'xlsx'.*must be one of auto, jsonl, json, sharegpt, csv, tsv, parquet, hf"):
        load_config(ini, dataset_format='xlsx')
    with pytest.raises(DataError, match='cannot tell the format of `rows.txt`'): check_data(load_config(ini, dataset_format='auto'))
    assert load_config(ini, dataset_file='org/name', dataset_format='hf').data.dataset_file == 'hf:org/name'


def _hub(tmp_path, env, spec='hf:taide-ft/no-such-dataset'):
    code = ("from taide_ft.dataset import load_rows, DataError\n"
            f"try: load_rows({spec!r})\nexcept DataError as e: print('DataError:', e)")
    env = {**os.environ, 'HF_HOME': str(tmp_path/'hf'), 'PYTHONPATH': str(ROOT), **env}
    t = time.monotonic()
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    return out.stdout + out.stderr, time.monotonic() - t


def test_hub_id_offline_fails_at_once_with_the_way_to_download(tmp_path):
    out, secs = _hub(tmp_path, {'HF_HUB_OFFLINE': '1'})
    assert out.startswith('DataError: the hub dataset `taide-ft/no-such-dataset` is not in this machine\'s cache and the hub is off'), out
    assert "datasets.load_dataset('taide-ft/no-such-dataset').save_to_disk('no-such-dataset')" in out and 'Traceback' not in out
    out, secs = _hub(tmp_path, {'HF_ENDPOINT': 'http://127.0.0.1:9'}, 'hf:taide-ft/no-such-dataset:train')  # nothing listens there
    assert out.startswith('DataError: cannot reach the Hugging Face hub for the dataset `taide-ft/no-such-dataset`'), out
    assert 'set HF_HUB_OFFLINE=1 to use a copy already in this machine' in out and secs < 20, (out, secs)


def test_long_rows_of_a_folder_name_their_file(tmp_path):
    f = tmp_path/'data'; f.mkdir()
    write_jsonl(f/'a.jsonl', GOOD)
    (f/'b.csv').write_text('instruction,output\n台灣最高的山？,' + '玉山。' * 200 + '\n', encoding='utf-8')
    d = build_dataset(cfg_for(tmp_path, f, max_seq_length=128, system_prompt=''), llama3_tokenizer())
    assert (d.stats['format'], d.stats['rows'], d.stats['long_rows']['lines'], d.stats['long_rows']['truncated']) == \
        ('folder (jsonl, csv)', 3, ['b.csv:2'], ['b.csv:2'])
