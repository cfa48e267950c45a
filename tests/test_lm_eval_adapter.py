"""The lm-evaluation-harness adapter: a stored gptflow model evaluated by lm-eval itself, offline, on a task
defined here, with numbers checked against gptflow's own scoring and plain forwards of the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

# Nothing may come from a hub: the task's data is a local JSON file (set before lm-eval imports datasets).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import builders  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows  # noqa: E402
from test_completion import SMALL_SUITE, chain_documents, token_stream  # noqa: E402

from model.checkpoint import save_model  # noqa: E402
from model.completion import CompletionResult, build_completion_suite, evaluate_suite, score_windows  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.lm_eval_adapter import GptflowLM  # noqa: E402
from model.quantize import save_quantized  # noqa: E402
from model.tokenizer import FILENAME, Tokenizer, train_bpe, train_char  # noqa: E402
from storage.errors import ConfigError, DataIntegrityError  # noqa: E402
from storage.store import Store  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TASK = "gptflow_completion"
BLOCK = 32


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT, Tokenizer]:
    """A GPT trained 25 steps on the chain documents (right on most items, not all) stored as a model
    folder with its tokenizer beside it."""
    documents = chain_documents()
    tokenizer = train_bpe(documents, 600)
    model = builders.train_gpt(token_stream(documents, tokenizer), tokenizer.vocab_size, steps=25, block_size=BLOCK)
    folder = tmp_path_factory.mktemp("model")
    save_model(folder, model)
    tokenizer.save(folder / FILENAME)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, stored) -> tuple[Path, CompletionResult]:
    """A multiple-choice lm-eval task over the completion suite (a local JSON Lines file), and gptflow's own
    result on it."""
    _, model, tokenizer = stored
    suite = build_completion_suite(chain_documents(), SMALL_SUITE.model_copy(update={"max_items": 40}))
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in suite.records()))
    # target_delimiter "": each ending already starts with its space, so the continuation is the ending.
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {folder / 'items.jsonl'}\n"
        f"  cache_dir: {folder / 'datasets-cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: endings\n"
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder, evaluate_suite(model, tokenizer, suite, BLOCK, batch_size=8)


@torch.no_grad()
def direct_log_likelihood(model: GPT, tokenizer: Tokenizer, context: str, continuation: str) -> float:
    """The continuation's log-likelihood from one plain forward: the context's trailing space moved to the
    continuation, each tokenized alone, end-of-text for an empty context, the last block_size + 1 tokens."""
    stripped = context.rstrip()
    context_ids = tokenizer.encode(stripped) or [tokenizer.eot_id]
    continuation_ids = tokenizer.encode(context[len(stripped) :] + continuation)
    sequence = (context_ids + continuation_ids)[-(BLOCK + 1) :]
    x = torch.tensor([sequence[:-1]])  # (1, T)
    log_probs = F.log_softmax(model(x, x)[0][0].double(), dim=-1)  # (T, vocab)
    first = len(sequence) - 1 - len(continuation_ids)
    return float(sum(log_probs[first + i, t] for i, t in enumerate(continuation_ids)))


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_gptflow_is_registered_beside_the_built_in_models() -> None:
    assert get_model("gptflow") is GptflowLM
    assert "hf" in model_registry  # registering gptflow first did not hide lm-eval's own models


def test_lm_eval_reports_the_suites_accuracy_with_our_log_likelihoods(stored, task) -> None:
    folder, _, _ = stored
    task_dir, ours = task
    results = simple_evaluate(
        model="gptflow",
        model_args={"path": str(folder), "batch_size": 8},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    scores = results["results"][TASK]
    assert scores["sample_len"] == ours.items == 40
    assert 0.6 <= ours.accuracy < 1.0  # well above chance (0.25), and not a model that is always right
    assert scores["acc,none"] == ours.accuracy
    assert scores["acc_norm,none"] == ours.accuracy_norm
    for sample in results["samples"][TASK]:
        lls = [ll for ll, _ in sample["filtered_resps"]]
        assert lls == pytest.approx(ours.log_likelihoods[sample["doc_id"]], abs=1e-5)


def test_loglikelihood_equals_a_direct_forward(stored) -> None:
    folder, model, tokenizer = stored
    lm = GptflowLM(path=str(folder), batch_size=3)
    long_context = " ".join(chain_documents()[0].split()[:60])  # far more than 32 tokens: cut from the left
    pairs = [
        ("Tligj pubv homfh", " nlhri ufep"),
        ("Tligj pubv homfh ", "nlhri"),  # the space moves to the continuation
        ("", "Tligj pubv"),  # end-of-text as the context
        (long_context, " muguo ervbio."),
    ]
    results = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    for (log_likelihood, _), pair in zip(results, pairs, strict=True):
        assert log_likelihood == pytest.approx(direct_log_likelihood(model, tokenizer, *pair), abs=1e-4)
    # is_greedy: true for the model's own greedy continuation, false for its least likely next token.
    context = "Tligj pubv homfh"
    ids = torch.tensor([tokenizer.encode(context)])  # (1, T)
    greedy = tokenizer.decode(model.generate(ids, 3, temperature=0.0)[0, ids.size(1) :].tolist())
    unlikely = tokenizer.decode([int(model(ids)[0][0, -1].argmin())])
    (_, is_greedy), (_, other) = lm.loglikelihood(
        [request("loglikelihood", context, greedy), request("loglikelihood", context, unlikely)]
    )
    assert is_greedy and not other


def test_windows_are_lm_evals_rolling_windows() -> None:
    for block_size in range(1, 9):
        for n in range(1, 30):
            tokens = list(range(100, 100 + n))
            sequence = [7, *tokens]  # 7: the prefix token
            ours = [(sequence[s:e], sequence[e - k + 1 : e + 1]) for s, e, k in score_windows(1, n, block_size)]
            assert ours == list(get_rolling_token_windows(tokens, 7, block_size, 1)), (block_size, n)


@torch.no_grad()
def test_loglikelihood_rolling_scores_each_token_once_in_lm_evals_windows(stored) -> None:
    folder, model, tokenizer = stored
    text = " ".join(chain_documents()[1:3])
    tokens = tokenizer.encode(text)
    assert len(tokens) > 3 * BLOCK and len(tokens) % BLOCK  # several windows, the last one not full
    expected = 0.0
    for inputs, predicted in get_rolling_token_windows(tokens, tokenizer.eot_id, BLOCK, 1):
        x = torch.tensor([inputs])  # (1, T)
        log_probs = F.log_softmax(model(x, x)[0][0].double(), dim=-1)  # (T, vocab)
        first = len(inputs) - len(predicted)
        expected += float(sum(log_probs[first + i, t] for i, t in enumerate(predicted)))
    (rolling,) = GptflowLM(path=str(folder)).loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert rolling == pytest.approx(expected, abs=1e-4)


def test_generate_until_decodes_greedily_up_to_a_stop_string(stored) -> None:
    folder, model, tokenizer = stored
    lm = GptflowLM(path=str(folder))
    context = "Tligj pubv homfh"
    ids = tokenizer.encode(context)
    reference = tokenizer.decode(model.generate(torch.tensor([ids]), 40, temperature=0.0)[0, len(ids) :].tolist())
    stop = reference[20:23]  # a stop string the greedy text holds, first found at or before character 20
    stopped, capped = lm.generate_until(
        [
            request("generate_until", context, {"until": [stop], "max_gen_toks": 40, "do_sample": False}),
            request("generate_until", context, {"until": [], "max_gen_toks": 21}),
        ]
    )
    assert stopped == reference[: reference.index(stop)]
    short = tokenizer.decode(model.generate(torch.tensor([ids]), 21, temperature=0.0)[0, len(ids) :].tolist())
    assert capped == short  # 21 tokens, over two calls of the chunked loop, as one call gives them
    with pytest.raises(ConfigError, match="greedily only"):
        lm.generate_until([request("generate_until", context, {"do_sample": True, "temperature": 1.0})])


def test_a_store_version_folder_finds_its_tokenizer_through_the_lineage(stored, tmp_path: Path) -> None:
    _, model, tokenizer = stored
    store = Store(tmp_path / "storage")

    def publish(stage: str, version: str, write, inputs: dict[str, str]) -> Path:
        def build(out: Path) -> None:
            write(out)

        store.publish(stage, version, build, params={}, inputs=inputs, code_version="t")
        return store.path(stage, version)

    publish("tokenizer", "tok1", tokenizer.save, {})
    pretrain = publish("pretrain", "pre1", lambda out: save_model(out, model), {"tokenizer": "tok1"})
    quantize = publish("quantize", "q1", lambda out: save_quantized(out, model), {"pretrain": "pre1"})
    for folder in (pretrain, quantize):
        lm = GptflowLM(path=str(folder))
        assert lm.tokenizer.to_json() == tokenizer.to_json()
        assert lm.max_length == BLOCK
    ((log_likelihood, _),) = GptflowLM(path=str(quantize)).loglikelihood([request("loglikelihood", "Tligj", " pubv")])
    # The dequantized int8 weights: close to the float model's numbers, not equal.
    assert log_likelihood == pytest.approx(direct_log_likelihood(model, tokenizer, "Tligj", " pubv"), abs=0.05)


def test_model_args_win_over_the_command_lines_defaults(stored) -> None:
    folder, _, _ = stored
    # lm-eval always passes its --batch_size (default 1) beside model_args.
    assert (
        GptflowLM.create_from_arg_string(f"path={folder},batch_size=4", {"batch_size": 1, "device": None}).batch_size
        == 4
    )
    assert GptflowLM.create_from_arg_string(f"path={folder}", {"batch_size": 2}).batch_size == 2


def test_bad_model_args_are_named(stored, tmp_path: Path) -> None:
    folder, _, _ = stored
    with pytest.raises(ConfigError, match="needs path="):
        GptflowLM()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere'}: no such model folder"):
        GptflowLM(path=str(tmp_path / "nowhere"))
    with pytest.raises(DataIntegrityError, match=f"{tmp_path}: no model.pt"):
        GptflowLM(path=str(tmp_path))
    with pytest.raises(ConfigError, match="batch_size must be a positive whole number, got 'auto'"):
        GptflowLM(path=str(folder), batch_size="auto")
    wide = train_char([chr(c) for c in range(0x100, 0x300)])  # 514 ids: more than the model's 300-odd
    wide.save(tmp_path / "wide.json")
    with pytest.raises(DataIntegrityError, match="not the tokenizer it was trained with"):
        GptflowLM(path=str(folder), tokenizer=str(tmp_path / "wide.json"))


@pytest.mark.slow  # lm-eval's command line indexes its 14,000 built-in tasks first: ~30 s on 2 cores
def test_the_command_line_evaluates_a_stored_model(stored, task, tmp_path: Path) -> None:
    folder, _, _ = stored
    task_dir, ours = task
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [
        sys.executable, "-m", "model.lm_eval_adapter", "--model", "gptflow",
        "--model_args", f"path={folder},batch_size=4,device=cpu",
        "--include_path", str(task_dir), "--tasks", TASK, "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results_file.read_text())["results"][TASK]
    assert (scores["acc,none"], scores["acc_norm,none"]) == (ours.accuracy, ours.accuracy_norm)
