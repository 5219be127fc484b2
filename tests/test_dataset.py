"End-to-end checks of `taide_ft.dataset` with the real Llama 3 and SmolLM2 tokenizers."
import codecs, json, logging, subprocess, sys
from pathlib import Path

import pytest

from taide_ft.config import TAIDE_SYSTEM_PROMPT, load_config
from taide_ft.dataset import (DataError, build_dataset, check_data, format_messages, load_rows, tokenize_row,
                              user_message)
from taide_ft.fixtures import llama3_tokenizer, smollm2_gguf, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT/'demo'/'train_data.jsonl'
CONTEXT = "晨光科技股份有限公司員工每年享有特別休假，年資滿一年者 7 天，滿三年者 14 天。"
TAIDE_ROW = {'instruction': '我在晨光科技已經做滿三年了，一年可以休幾天特休？', 'input': CONTEXT,
             'output': '根據規定，年資滿三年的員工每年享有 14 天特別休假。'}


@pytest.fixture(scope='module')
def llama():
    return llama3_tokenizer()


@pytest.fixture(scope='module')
def smol():
    from transformers import AutoTokenizer
    p = smollm2_gguf()
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def cfg_for(tmp_path, data, **kw):
    kw.setdefault('eval_split', 0.0)  # every row trains unless a test holds some out
    return load_config(None, check_files=False, dataset_file=data, output_dir=tmp_path/'out', **kw)


def answers(tok, r):
    "Decoded runs of consecutive labelled tokens."
    runs, cur = [], []
    for t in r['labels'] + [-100]:
        if t != -100: cur.append(t)
        elif cur: runs.append(tok.decode(cur)); cur = []
    return runs


def bad_problems(path, **kw):
    with pytest.raises(DataError) as e: load_rows(path, **kw)
    return e.value.problems


# ---------------------------------------------------------------- formatting and labels

def test_taide_example_matches_llama31_format(llama):
    msgs = format_messages(TAIDE_ROW, TAIDE_SYSTEM_PROMPT)
    r = tokenize_row(msgs, llama, 4096, True)
    ref = ('<|begin_of_text|>'
           '<|start_header_id|>system<|end_header_id|>\n\n' + TAIDE_SYSTEM_PROMPT + '<|eot_id|>'
           '<|start_header_id|>user<|end_header_id|>\n\n' + '參考資料：\n' + CONTEXT + '\n\n' + TAIDE_ROW['instruction'] + '<|eot_id|>'
           '<|start_header_id|>assistant<|end_header_id|>\n\n')
    prompt_ids = llama.encode(ref, add_special_tokens=False)
    answer_ids = llama.encode(TAIDE_ROW['output'] + '<|eot_id|>', add_special_tokens=False)
    assert r['input_ids'] == prompt_ids + answer_ids
    assert r['input_ids'][0] == 128000 and r['input_ids'].count(128000) == 1  # one <|begin_of_text|>
    assert r['labels'] == [-100] * len(prompt_ids) + answer_ids
    assert llama.decode([t for t in r['labels'] if t != -100]) == TAIDE_ROW['output'] + '<|eot_id|>'
    assert r['labels'][-1] == 128009


def test_all_tokens_when_not_responses_only(llama):
    r = tokenize_row(format_messages(TAIDE_ROW), llama, 4096, False)
    assert r['labels'] == r['input_ids']


def test_user_turn_layout():
    assert user_message('問題', '資料') == '參考資料：\n資料\n\n問題'
    assert user_message('  問題\n', '  ') == '問題'
    assert format_messages({'instruction': 'q', 'output': 'a'}, '') == [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]


def test_multi_turn_labels_every_answer(llama):
    row = {'messages': [{'role': 'user', 'content': '你好'}, {'role': 'assistant', 'content': '你好！有什麼可以幫忙？'},
                        {'role': 'user', 'content': '台灣最高的山？'}, {'role': 'assistant', 'content': '玉山。'}]}
    r = tokenize_row(format_messages(row, TAIDE_SYSTEM_PROMPT), llama, 4096, True)
    assert answers(llama, r) == ['你好！有什麼可以幫忙？<|eot_id|>', '玉山。<|eot_id|>']
    assert llama.decode(r['input_ids']).count(TAIDE_SYSTEM_PROMPT) == 1
    own = format_messages({'messages': [{'role': 'system', 'content': '自訂'}] + row['messages']}, TAIDE_SYSTEM_PROMPT)
    assert [m['role'] for m in own] == ['system', 'user', 'assistant', 'user', 'assistant'] and own[0]['content'] == '自訂'


def test_smollm2_chatml(smol):
    assert '<|im_start|>' in smol.chat_template and '<|im_end|>' in smol.chat_template
    r = tokenize_row(format_messages(TAIDE_ROW, TAIDE_SYSTEM_PROMPT), smol, 4096, True)
    text = smol.decode(r['input_ids'])
    assert text.startswith('<|im_start|>system\n' + TAIDE_SYSTEM_PROMPT + '<|im_end|>\n<|im_start|>user\n參考資料：')
    assert answers(smol, r) == [TAIDE_ROW['output'] + '<|im_end|>']
    labelled = [t for t in r['labels'] if t != -100]
    assert labelled[-1] == smol.convert_tokens_to_ids('<|im_end|>')
    assert smol.decode(r['input_ids'][len(r['input_ids']) - r['labels'][::-1].index(labelled[-1]):]) == '\n'  # ChatML's newline after the turn: no loss


def test_no_chat_template_is_refused(llama):
    plain = llama3_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match='has no chat template'):
        tokenize_row(format_messages(TAIDE_ROW), plain, 4096, True)


# ---------------------------------------------------------------- reading and validation

def test_every_bad_row_with_line_numbers(tmp_path):
    p = tmp_path/'train.jsonl'
    lines = ['{"instruction": "q", "output": "a"}',
             '{"instruction": "q", "output": "a"',          # 2 invalid JSON
             '"just a string"',                             # 3 not an object
             '{"output": "a"}',                              # 4 missing instruction
             '{"instruction": "q"}',                         # 5 missing output
             '{"instruction": "", "output": "a"}',           # 6 empty
             '{"instruction": "q", "output": " \\t\\n"}',    # 7 whitespace only
             '{"instruction": ["q"], "output": "a"}',        # 8 not a string
             '{"instruction": "q", "input": 3, "output": "a"}',  # 9 input not a string
             '{"instruction": "q", "output": null}']        # 10 null output
    p.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    probs = bad_problems(p)
    assert probs == [
        'train.jsonl line 2: invalid JSON (Expecting \',\' delimiter at column 35)',
        'train.jsonl line 3: a JSON string, not an object; each line must be one {"instruction", "input", "output"} object',
        'train.jsonl line 4: missing `instruction`',
        'train.jsonl line 5: missing `output`',
        'train.jsonl line 6: `instruction` is empty',
        'train.jsonl line 7: `output` is only whitespace',
        'train.jsonl line 8: `instruction` is an array, not a string',
        'train.jsonl line 9: `input` is a number, not a string',
        'train.jsonl line 10: `output` is null, not a string']
    with pytest.raises(DataError, match=r'^9 bad rows:\n  - train.jsonl line 2: invalid JSON') as e: load_rows(p)
    assert 'SKIP_BAD_ROWS = true' in str(e.value) and isinstance(e.value, ValueError)


def test_message_lists_20_and_the_total(tmp_path):
    p = write_jsonl(tmp_path/'t.jsonl', [{'instruction': 'q'}] * 25 + [{'instruction': 'q', 'output': 'a'}])
    with pytest.raises(DataError) as e: load_rows(p)
    msg = str(e.value)
    assert msg.startswith('25 bad rows:') and 't.jsonl line 20: missing `output`' in msg
    assert 'line 21:' not in msg and '... and 5 more' in msg and e.value.total == 25


def test_whole_file_problems(tmp_path):
    p = tmp_path/'data.jsonl'
    p.write_text('', encoding='utf-8')
    with pytest.raises(DataError, match='`data.jsonl` is empty'): load_rows(p)
    p.write_text('\n \r\n\n', encoding='utf-8')
    with pytest.raises(DataError, match='`data.jsonl` is empty'): load_rows(p)
    p.write_text(json.dumps([{'instruction': 'q', 'output': 'a'}] * 3, indent=2), encoding='utf-8')
    assert [r.line for r in load_rows(p)] == [2, 6, 10]  # auto: the array is read as it is
    with pytest.raises(DataError) as e: load_rows(p, dataset_format='jsonl')
    assert 'is one JSON array, not JSON Lines' in str(e.value)
    assert "jq -c '.[]' data.jsonl > data.jsonl" in str(e.value) and 'python -c' in str(e.value)
    p.write_text('{\n  "instruction": "q",\n  "output": "a"\n}\n', encoding='utf-8')
    with pytest.raises(DataError, match='spread over 4 lines'): load_rows(p)
    with pytest.raises(FileNotFoundError, match='DATASET_FILE'): load_rows(tmp_path/'none.jsonl')


def test_accepted_as_is(tmp_path, caplog):
    p = tmp_path/'ok.jsonl'
    rows = [{'instruction': '問題一', 'output': '答一', 'id': 1, 'source': 'faq'},
            {'instruction': '問題二', 'input': CONTEXT, 'output': '答二', 'id': 2},
            {'instruction': '問題三', 'input': '', 'output': '答三', 'source': 'x'}]
    body = '\r\n\r\n'.join(json.dumps(r, ensure_ascii=False) for r in rows) + '\r\n\r\n'
    p.write_bytes(codecs.BOM_UTF8 + body.encode('utf-8'))
    with caplog.at_level(logging.WARNING, logger='taide_ft'):
        got = load_rows(p)
    assert [r.line for r in got] == [1, 3, 5] and got.shape == 'instruction'
    assert got[0].data['instruction'] == '問題一'  # the BOM is not part of the first key
    warns = [r.getMessage() for r in caplog.records if 'ignoring fields' in r.getMessage()]
    assert warns == ['ok.jsonl: ignoring fields not used for training: `id`, `source`']


def test_messages_rows_validated(tmp_path):
    U = lambda c='q': {'role': 'user', 'content': c}
    A = lambda c='a': {'role': 'assistant', 'content': c}
    rows = [{'messages': [U(), A()]},
            {'messages': [{'role': 'human', 'content': 'q'}, A()]},
            {'messages': [U(), {'role': 'assistant', 'content': 7}]},
            {'messages': [{'role': 'system', 'content': 's'}, A()]},
            {'messages': [U(), A(), U()]},
            {'messages': []},
            {'messages': [U(), A()], 'instruction': 'q', 'output': 'a'},
            {'instruction': 'q', 'output': 'a'}]
    p = write_jsonl(tmp_path/'chat.jsonl', rows)
    probs = bad_problems(p)
    assert probs[0] == 'chat.jsonl line 2: message 1 has role "human"; use system, user or assistant'
    assert probs[1] == 'chat.jsonl line 3: message 2: `content` is a number, not a string'
    assert probs[2].startswith('chat.jsonl line 4: message 2 is a assistant turn where a user turn is due')
    assert probs[3] == 'chat.jsonl line 5: the last message is a user turn; end with the assistant turn to learn'
    assert probs[4] == 'chat.jsonl line 6: `messages` is empty'
    assert probs[5] == 'chat.jsonl line 7: has both `messages` and `instruction`/`output`; use one shape'
    assert probs[6].startswith('chat.jsonl line 8: switches to the {"instruction", "input", "output"} shape, while line 1 set {"messages": [...]}')
    assert len(probs) == 7


def test_mixed_shapes_name_the_switching_line(tmp_path):
    p = write_jsonl(tmp_path/'mix.jsonl', [{'instruction': 'q', 'output': 'a'}] * 3 +
                    [{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}])
    assert bad_problems(p) == ['mix.jsonl line 4: switches to the {"messages": [...]} shape, while line 1 set '
                               '{"instruction", "input", "output"}; a file holds one shape: convert these rows or put them in their own file']


def test_skip_bad_rows_writes_rejected(tmp_path, llama):
    p = tmp_path/'train.jsonl'
    p.write_text('{"instruction": "q1", "output": "a1"}\nnot json\n{"instruction": "q2"}\n{"instruction": "q3", "output": "a3"}\n', encoding='utf-8')
    cfg = cfg_for(tmp_path, p)
    with pytest.raises(DataError, match='train.jsonl line 2: invalid JSON'): check_data(cfg)
    assert not (tmp_path/'out'/'rejected.jsonl').exists()
    cfg.data.skip_bad_rows = True
    st = check_data(cfg)
    assert (st['rows'], st['bad_rows']) == (2, 2)
    rej = [json.loads(l) for l in (tmp_path/'out'/'rejected.jsonl').read_text(encoding='utf-8').splitlines()]
    assert [(r['line'], r['text']) for r in rej] == [(2, 'not json'), (3, '{"instruction": "q2"}')]
    assert rej[1]['problem'] == 'train.jsonl line 3: missing `output`'
    data = build_dataset(cfg, llama)
    assert data.stats['rows'] == 2 and data.stats['bad_rows'] == 2
    assert not list((tmp_path/'out').glob('.*.tmp'))  # atomic writes leave no temp files


def test_check_data_needs_no_tokenizer(tmp_path):
    p = write_jsonl(tmp_path/'t.jsonl', [TAIDE_ROW] * 3)
    code = ("import sys; from taide_ft.config import load_config; from taide_ft.dataset import check_data; "
            f"st = check_data(load_config(None, check_files=False, dataset_file={str(p)!r}, output_dir={str(tmp_path/'o')!r})); "
            "print(st['rows'], st['shape'], 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ['3', 'instruction', 'False', 'False']


# ---------------------------------------------------------------- building

def test_long_rows_truncate_and_drop(tmp_path, llama, caplog):
    short = {'instruction': '台灣最高的山？', 'output': '玉山。'}
    long_answer = {'instruction': '台灣最高的山？', 'output': '玉山。' * 200}
    long_prompt = {'instruction': '台灣最高的山？', 'input': '玉山。' * 300, 'output': '玉山。'}
    p = write_jsonl(tmp_path/'t.jsonl', [short, long_answer, short, long_prompt])
    cfg = cfg_for(tmp_path, p, max_seq_length=128, system_prompt='')
    with caplog.at_level(logging.WARNING, logger='taide_ft'):
        data = build_dataset(cfg, llama)
    lr = data.stats['long_rows']
    assert (lr['count'], lr['lines'], lr['truncated'], lr['dropped'], lr['prompt_too_long']) == (2, [2, 4], [2], [4], [4])
    assert lr['longest'] > 300 and data.stats['rows'] == 3
    assert max(data.train['length']) == 128
    cut = data.train[1]
    assert cut['labels'][-1] != -100 and llama.eos_token_id not in cut['labels']  # answer tail cut, prompt kept
    assert cut['input_ids'][:20] == tokenize_row(format_messages(long_answer, ''), llama)['input_ids'][:20]
    log = '\n'.join(r.getMessage() for r in caplog.records)
    assert '2 rows longer than MAX_SEQ_LENGTH = 128' in log and 'prompt alone is over 128 tokens: lines 4' in log
    cfg.data.long_rows = 'drop'
    data = build_dataset(cfg, llama)
    assert data.stats['rows'] == 2 and data.stats['long_rows']['dropped'] == [2, 4]


def test_loss_tokens_count_the_labels_that_carry_loss(tmp_path, llama):
    """Each row's `loss_tokens`: its labels after the first (the model predicts token k from those before it), the
    count a step's loss is averaged over; the same for eval rows."""
    multi = {'messages': [{'role': 'user', 'content': '你好'}, {'role': 'assistant', 'content': '你好！'},
                          {'role': 'user', 'content': '台灣最高的山？'}, {'role': 'assistant', 'content': '玉山。'}]}
    p = write_jsonl(tmp_path/'t.jsonl', [TAIDE_ROW, {'instruction': 'q', 'output': 'a'}, {'instruction': '1+1?', 'output': '2'}] * 2)
    m = write_jsonl(tmp_path/'m.jsonl', [multi] * 4)
    for only in (True, False):
        d = build_dataset(cfg_for(tmp_path, p, train_on_responses_only=only, eval_split=0.34), llama)
        assert d.train.column_names == d.eval.column_names == ['input_ids', 'labels', 'length', 'loss_tokens']
        assert (len(d.train), len(d.eval)) == (4, 2)
        for r in list(d.train) + list(d.eval):
            want = sum(t != -100 for t in r['labels'][1:])
            assert r['loss_tokens'] == want and r['length'] == len(r['input_ids'])
            assert want == (len(r['input_ids']) - 1 if not only else sum(t != -100 for t in r['labels']))
        s = d.stats  # the stats count every labelled token; the column leaves out each row's first
        assert sum(d.train['loss_tokens']) == s['loss_tokens'] - (0 if only else s['rows'])
    d = build_dataset(cfg_for(tmp_path, m), llama)
    ans = len(llama.encode('你好！<|eot_id|>', add_special_tokens=False)) + len(llama.encode('玉山。<|eot_id|>', add_special_tokens=False))
    assert d.train['loss_tokens'] == [ans] * 4


def test_eval_split_is_seeded(tmp_path, llama):
    p = write_jsonl(tmp_path/'t.jsonl', [{'instruction': f'問題 {i}', 'output': f'答案 {i}'} for i in range(40)])
    a = build_dataset(cfg_for(tmp_path, p, eval_split=0.25, seed=1), llama)
    b = build_dataset(cfg_for(tmp_path, p, eval_split=0.25, seed=1), llama)
    c = build_dataset(cfg_for(tmp_path, p, eval_split=0.25, seed=2), llama)
    assert (a.stats['rows'], a.stats['eval_rows']) == (30, 10) and a.stats['eval_source'].startswith('split')
    assert a.eval['input_ids'] == b.eval['input_ids'] and a.eval['input_ids'] != c.eval['input_ids']
    assert not set(map(tuple, a.eval['input_ids'])) & set(map(tuple, a.train['input_ids']))


def test_eval_file_validated_the_same_way(tmp_path, llama):
    p = write_jsonl(tmp_path/'t.jsonl', [TAIDE_ROW] * 4)
    e = write_jsonl(tmp_path/'eval.jsonl', [TAIDE_ROW, {'instruction': 'q', 'output': ''}])
    with pytest.raises(DataError, match='eval.jsonl line 2: `output` is empty'):
        build_dataset(cfg_for(tmp_path, p, eval_file=e), llama)
    write_jsonl(e, [TAIDE_ROW] * 2)
    d = build_dataset(cfg_for(tmp_path, p, eval_file=e, eval_split=0.5), llama)
    assert (d.stats['rows'], d.stats['eval_rows'], d.stats['eval_source']) == (4, 2, 'file')


@pytest.mark.parametrize('which', ['llama', 'smol'])
def test_demo_data_with_both_tokenizers(tmp_path, which, request):
    tok = request.getfixturevalue(which)
    cfg = cfg_for(tmp_path, DEMO)
    assert check_data(cfg)['rows'] == 175
    data = build_dataset(cfg, tok)
    s = data.stats
    assert (s['rows'], s['eval_rows'], s['turns'], s['long_rows']['count'], s['bad_rows']) == (175, 0, 175, 0, 0)
    assert s['prompt_tokens'] + s['answer_tokens'] == s['tokens'] == sum(data.train['length'])
    assert 0.05 < s['loss_share'] < 0.6
    end = '<|eot_id|>' if which == 'llama' else '<|im_end|>'
    rows = load_rows(DEMO)
    for i in (0, 1, 174):
        labels = data.train[i]['labels']
        assert tok.decode([t for t in labels if t != -100]) == rows[i].data['output'].strip() + end
    png = data.plot_lengths()
    assert png == tmp_path/'out'/'lengths.png' and png.read_bytes()[:4] == b'\x89PNG'
