"""scripts/generate.py as a user runs it: greedy output equals transformers + PEFT `generate(do_sample=False)` token
for token (an adapter that added tokens, tied and untied head; a chat over several turns; a run folder and its merged
export), the text streams, and bad input is one error line."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

import tiny

torch = pytest.importorskip("torch")  # every test here compares with PEFT's `generate`, or needs an adapter PEFT saved
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate.py"
NEW = 12  # new tokens per reply
ADDED = ("<|a|>", "<|b|>")  # tokens the adapter adds; the chat template below uses them as header and end of turn
PROMPT = f"The cat {ADDED[0]} sat on {ADDED[1]} the"
TEMPLATE = ("{% for m in messages %}<|a|>{{ m['role'] }}\n{{ m['content'] }}<|b|>{% endfor %}"
            "{% if add_generation_prompt %}<|a|>assistant\n{% endif %}")
EOS = 1  # the tiny tokenizer's and checkpoint's <|end_of_text|>

pytestmark = pytest.mark.slow  # scripts/generate.py end to end, against adapters PEFT trained


@pytest.fixture(scope="module")
def adapters(torch_checkpoint, tmp_path_factory):
    """`adapters(tied)` -> (base directory with its tokenizer, adapter directory, PEFT model, adapter tokenizer): a
    PEFT adapter on the tiny base that adds two tokens and trains their rows (and one existing row) beside LoRA,
    saved as PEFT users save it, with random nonzero weights so that every part changes the output."""
    cache = {}

    def get(tied: bool):
        if tied not in cache:
            source, hf = torch_checkpoint(tied=tied, vocab=300)
            root = tmp_path_factory.mktemp("generate_tied" if tied else "generate_untied")
            shutil.copytree(source, root / "base")
            tokenizer = tiny.make_tokenizer(root / "base")
            tokenizer.add_tokens(list(ADDED), special_tokens=True)
            added = tokenizer.convert_tokens_to_ids(list(ADDED))
            model = copy.deepcopy(hf)
            model.resize_token_embeddings(len(tokenizer))
            indices = [5, *added] if tied else {"embed_tokens": [5, *added], "lm_head": added}
            config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                     trainable_token_indices=indices)
            model = peft.get_peft_model(model, config)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.3 * torch.randn(p.shape, generator=generator))
            model.save_pretrained(root / "adapter", save_embedding_layers=False)
            tokenizer.save_pretrained(root / "adapter")
            cache[tied] = (root / "base", root / "adapter", model.eval(), tokenizer)
        return cache[tied]

    return get


def hf_greedy(model, prompt_ids, eos_ids, new=NEW) -> list[int]:
    """transformers' greedy continuation (without the prompt), stopping at any of `eos_ids`."""
    ids = torch.tensor([prompt_ids])
    config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=list(eos_ids),
                                           pad_token_id=EOS, bos_token_id=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_ids):].tolist()


def run_generate(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)


def replies(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"text"')]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_equals_peft_on_an_adapter_that_added_tokens(adapters, tied, capsys):
    base, adapter, peft_model, tokenizer = adapters(tied)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert set(tokenizer.convert_tokens_to_ids(list(ADDED))) <= set(prompt_ids)
    expected = hf_greedy(peft_model, prompt_ids, [EOS])

    args = ["--model", base, "--adapter", adapter, "--prompt", PROMPT, "--max-new-tokens", NEW, "--json"]
    if tied:  # the same code path in this process, which has jax and torch loaded already
        code, stdout, stderr = _run_in_process(args, capsys)
    else:
        result = run_generate(*args)
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert code == 0, stderr[-3000:]
    [out] = replies(stdout)
    assert out["token_ids"] == expected
    text = tokenizer.decode(expected[:-1] if expected[-1] == EOS else expected, skip_special_tokens=False)
    assert out["text"] == text
    # the text streamed before the JSON line is that text
    assert stdout == f"{text}\n{json.dumps(out, ensure_ascii=False)}\n"


def test_chat_turns_equal_peft(adapters, tmp_path):
    base, adapter, peft_model, tokenizer = adapters(False)
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    turns = ["Hi", "And 2?"]
    end_of_turn = tokenizer.convert_tokens_to_ids(ADDED[1])
    result = run_generate("--model", base, "--adapter", adapter, "--chat", "--chat-template", template,
                          "--max-new-tokens", 6, "--json", stdin="".join(t + "\n" for t in turns))
    assert result.returncode == 0, result.stderr[-3000:]
    got = replies(result.stdout)
    assert len(got) == len(turns)
    messages = []
    for turn, out in zip(turns, got):
        messages.append({"role": "user", "content": turn})
        text = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                             tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(prompt_ids) + 6 <= 64  # within the tiny model's context, which transformers would run past
        expected = hf_greedy(peft_model, prompt_ids, [EOS, end_of_turn], new=6)
        assert out["token_ids"] == expected
        reply = tokenizer.decode([t for t in expected if t not in (EOS, end_of_turn)], skip_special_tokens=False)
        assert out["text"] == reply
        messages.append({"role": "assistant", "content": reply.strip()})


def test_run_folder_and_its_merged_export_equal_transformers(untrained_run, capsys):
    run = untrained_run.out
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "merged")
    prompt = f"The cat sat on {tiny.NEW_TOKEN} the"
    expected = hf_greedy(merged, tokenizer(prompt)["input_ids"], [EOS])
    result = run_generate("--run", run, "--prompt", prompt, "--max-new-tokens", NEW, "--json")  # latest checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    assert replies(result.stdout)[0]["token_ids"] == expected
    code, stdout, stderr = _run_in_process(["--model", run / "merged", "--prompt", prompt, "--max-new-tokens", NEW,
                                            "--json"], capsys)
    assert code == 0, stderr[-3000:]
    assert replies(stdout)[0]["token_ids"] == expected


def _run_in_process(argv: list, capsys) -> tuple[int, str, str]:
    return tiny.run_script(SCRIPT, argv, capsys)


def test_bad_input_is_one_error_line(adapters, torch_checkpoint, tmp_path, capsys):
    base, adapter, _, _ = adapters(False)
    other, hf_other = torch_checkpoint(tied=False, vocab=300, layers=3)  # an adapter for a 3-layer base
    peft.get_peft_model(copy.deepcopy(hf_other), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "other_adapter")
    long_prompt = " ".join(tiny.CORPUS)
    cases = [
        (["--model", tmp_path / "missing", "--prompt", "x"], f"model directory {tmp_path / 'missing'} does not exist"),
        (["--model", base, "--adapter", tmp_path / "missing", "--prompt", "x"],
         f"adapter directory {tmp_path / 'missing'} does not exist"),
        (["--run", tmp_path, "--prompt", "x"], "is not a jaxtok run directory"),
        (["--model", base, "--adapter", tmp_path / "other_adapter", "--prompt", "x"], "layers"),
        (["--model", base, "--adapter", adapter, "--prompt", long_prompt],
         "but the model's context is 64 (max_position_embeddings); shorten it"),
        (["--model", base, "--chat"], "the tokenizer has no chat template; pass --chat-template FILE"),
        (["--model", base, "--chat", "--chat-template", tmp_path / "none.jinja"], "none.jinja does not exist"),
        (["--model", base, "--prompt", "x", "--top-p", "2"], "top_p=2.0"),
        (["--prompt", "x"], "name a model: --model DIR_OR_HUB_ID, or --run OUTPUT_DIR"),
    ]
    failures = []
    for argv, expected in cases:
        code, out, err = _run_in_process(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        if code != 2 or len(errors) != 1 or lines[-1] != errors[0] or expected not in errors[0] or "Traceback" in err:
            failures.append(f"{argv}: exit {code}, stderr {err[-600:]!r}")
    assert not failures, "\n".join(failures)
