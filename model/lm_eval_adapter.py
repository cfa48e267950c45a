"""A gptflow model as an lm-evaluation-harness model: `--model gptflow`.

lm-evaluation-harness 0.4.13 finds a model class by name in its registry, and has no entry point or
command-line option that imports an outside module into it (`--include_path` adds task folders only). So
the class registers itself when this module is imported, and running the module runs lm-eval's own command
line after that import (lm-eval installed: `pip install -e ".[eval]"`):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m model.lm_eval_adapter \\
        --model gptflow --model_args path=storage/pretrain/<version>,device=cpu,batch_size=8 \\
        --include_path my_tasks/ --tasks my_task --output_path results/

with, offline, a task whose data is a local file, e.g. `my_tasks/my_task.yaml` for rows
{"context": ..., "endings": [...], "label": i} (`model.completion.CompletionSuite.records`):

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/items.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{context}}"
    doc_to_choice: endings
    doc_to_target: label
    target_delimiter: ""
    metric_list: [{metric: acc}, {metric: acc_norm}]

Every `lm_eval` option works the same way (`run`, `ls tasks`, `--limit`, `--log_samples`, ...). From Python,
import this module and call `lm_eval.simple_evaluate(model="gptflow", model_args={...}, ...)`, or pass a
`GptflowLM(...)` itself as `model`.

model_args:
- `path` (required): a model folder (`model.pt`, or the quantize stage's `model_int8.pt` / `model_int4.pt`,
  with `model_config.json`), e.g. a pretrain, finetune or quantize version folder of the store;
- `tokenizer`: a `tokenizer.json` (or its folder). Unset: the one beside the weights, else, for a store
  version folder, the tokenizer version in its lineage;
- `device` (default cpu), `batch_size` (default 8; a number: `auto` is not offered), `max_gen_toks`
  (default 256, lm-eval's). A value given in model_args wins over the command line's `--batch_size` (whose
  default of 1 lm-eval always passes) and `--device`.

What each request computes (`model.completion`, which the completion suite scores with too):
- `loglikelihood(context, continuation)`: the continuation's summed log-probability and whether greedy
  decoding would produce it; context and continuation are tokenized separately, whitespace that ends the
  context moving to the continuation, an empty context being end-of-text; the sequence is cut from the left
  to the model's context (block_size), a continuation longer than it scored in windows.
- `loglikelihood_rolling(text)`: the text's log-probability after end-of-text, in lm-eval's rolling
  windows of block_size (each token predicted once, every window but the first with a full context).
- `generate_until(context, gen_kwargs)`: greedy decoding with `model.generate`, stopped at end-of-text, at
  `max_gen_toks` new tokens, or at the first of the `until` strings (cut from the text returned).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Built-in models are registered as lazy entries when lm_eval.models is imported, which lm-eval does only
# while its registry is empty: import it before adding gptflow, so that "hf" and the others stay available.
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string

from model.checkpoint import WEIGHTS, load_model
from model.completion import encode_request, score_continuations
from model.gpt import GPT
from model.quantize import QUANTIZED_FILES, load_quantized
from model.tokenizer import FILENAME, Tokenizer
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until
_GENERATE_CHUNK = 16  # new tokens per model.generate call between checks for a stop string


def _tokenizer_file(folder: Path, tokenizer: str | Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer).expanduser()
    if (folder / FILENAME).is_file():
        return folder / FILENAME
    store, stage, version = Store(folder.parent.parent), folder.parent.name, folder.name
    if store.has(stage, version):
        found = store.lineage(stage, version).get("tokenizer")
        if found is not None:
            return store.path("tokenizer", found) / FILENAME
    raise ConfigError(
        f"{folder}: no {FILENAME} beside the model and no tokenizer in a store lineage: pass tokenizer=PATH"
    )


def load_gptflow(
    path: str | Path, tokenizer: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer]:
    """The model in folder `path` (float, or the dequantized quantize-stage weights) and its tokenizer
    (`tokenizer`, else the module docstring's search)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such model folder")
    if (folder / WEIGHTS).is_file():
        model = load_model(folder, device)
    elif any((folder / name).is_file() for name in QUANTIZED_FILES.values()):
        model = load_quantized(folder, device)
    else:
        raise DataIntegrityError(f"{folder}: no {WEIGHTS} nor {' / '.join(QUANTIZED_FILES.values())}")
    tok = Tokenizer.load(_tokenizer_file(folder, tokenizer))
    if tok.vocab_size > model.config.vocab_size:
        raise DataIntegrityError(
            f"{folder}: the tokenizer has {tok.vocab_size} ids, more than the model's vocab_size "
            f"{model.config.vocab_size}: not the tokenizer it was trained with"
        )
    return model, tok


def _positive_int(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"gptflow: {name} must be a positive whole number, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"gptflow: {name} must be a positive whole number, got {value!r}")
    return number


def _device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"gptflow: device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"gptflow: device {name!r} was asked for but no CUDA device is available")
    return device


@register_model("gptflow")
class GptflowLM(LM):
    """A gptflow GPT and its tokenizer behind lm-eval's three request types (module docstring)."""

    def __init__(
        self,
        path: str | Path | None = None,
        tokenizer: str | Path | Tokenizer | None = None,
        device: str = "cpu",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        model: GPT | None = None,
    ) -> None:
        """Load the model in folder `path`, or wrap `model` (in memory) with `tokenizer` (a Tokenizer)."""
        super().__init__()
        self._device = _device(device)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if model is not None:
            if not isinstance(tokenizer, Tokenizer):
                raise ConfigError("gptflow: a model given in memory needs its Tokenizer as tokenizer=")
            self.model, self.tokenizer = model.to(self._device).eval(), tokenizer
        elif path is not None:
            if isinstance(tokenizer, Tokenizer):
                raise ConfigError("gptflow: tokenizer= is a path when the model is loaded from path=")
            self.model, self.tokenizer = load_gptflow(str(path), tokenizer, self._device)
        else:
            raise ConfigError("gptflow: model_args needs path=MODEL_FOLDER (a store version folder or model dir)")
        self.block_size = self.model.config.block_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "GptflowLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "GptflowLM":
        # lm-eval passes --batch_size (default 1) and --device beside model_args; model_args win, as the more
        # specific (lm-eval's own merge would fail on a key given both ways).
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    def _score(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        scores = score_continuations(self.model, requests, self.block_size, self.batch_size, self._device)
        return [(s.log_likelihood, s.greedy) for s in scores]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        results = self._score([encode_request(self.tokenizer, context, cont) for context, cont in pairs])
        for args, result in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        texts = [req.args[0] for req in requests]
        scores = self._score([([self.tokenizer.eot_id], self.tokenizer.encode(text)) for text in texts])
        results = [log_likelihood for log_likelihood, _ in scores]
        for text, result in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs["do_sample"]:
                raise ConfigError("gptflow: generate_until decodes greedily only; the task asks for do_sample=True")
            # End-of-text stops generation as a token; an empty stop string would stop it before it starts.
            until = [stop for stop in handle_stop_sequences(kwargs["until"], eos=None) if stop]
            text = self._generate(context, until, kwargs["max_gen_toks"])
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    def _generate(self, context: str, until: list[str], max_new_tokens: int) -> str:
        """Greedy continuation of `context`: up to end-of-text, `max_new_tokens`, or the first stop string."""
        prompt = (self.tokenizer.encode(context) or [self.tokenizer.eot_id])[-self.block_size :]
        idx = torch.tensor([prompt], dtype=torch.long, device=self._device)  # (1, T)
        new: list[int] = []
        while len(new) < max_new_tokens:
            step = min(_GENERATE_CHUNK, max_new_tokens - len(new))
            out = self.model.generate(idx, step, temperature=0.0, stop_token=self.tokenizer.eot_id)  # (1, T+step)
            added = out[0, idx.size(1) :].tolist()
            idx = out[:, -self.block_size :]  # the window the next call continues from
            if self.tokenizer.eot_id in added:
                new += added[: added.index(self.tokenizer.eot_id)]
                break
            new += added
            # Greedy decoding is deterministic, so stopping between calls gives what one long call would.
            if any(stop in self.tokenizer.decode(new) for stop in until):
                break
        text = self.tokenizer.decode(new)
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


def main() -> None:
    """`python -m model.lm_eval_adapter ARGS`: lm-eval's command line, with `--model gptflow` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
