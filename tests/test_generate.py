"""Generation: the KV cache gives a full forward pass's logits, sampling is the same with or without it
(within the context and past it), top-k / top-p / greedy / stop-token behave, and the users of generate
(`gptflow generate`, the quantize stage's decoding speed, the dynamic int8 model) get them."""

import builders
import pytest
import torch

from flows import generate as generate_task
from model.gpt import GPT, GPTConfig, sample_next
from model.quantize import decode_tokens_per_s, to_dynamic_int8
from model.tokenizer import train_char

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 48
RECIPES = {
    "gpt2": {},
    "modern": dict(rope=True, qk_norm=True, mlp="relu2", tie_embeddings=False),
}


def scrambled_gpt(recipe: str, block_size: int = 16, vocab_size: int = VOCAB, seed: int = 0) -> GPT:
    """A GPT whose every parameter is random, gains and biases too, so that each part shows in the logits
    (an untrained GPT's logits are nearly uniform, and nearly uniform logits agree with almost anything)."""
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **RECIPES[recipe])
    model = GPT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_incremental_decoding_gives_the_full_forward_logits(recipe: str) -> None:
    model = scrambled_gpt(recipe)
    idx = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx, idx)  # (B, T, vocab): every position from one pass
    cache = model.new_cache()
    steps = [(0, 3), (3, 7)] + [(t, t + 1) for t in range(7, 14)]  # a prefill, a chunk after it, single tokens
    for start, end in steps:
        logits, _ = model(idx[:, start:end], cache=cache)
        torch.testing.assert_close(logits[:, 0], full[:, end - 1], rtol=1e-5, atol=1e-5)
    assert cache.length == 14
    # The cache is what carries the context: the same last token without it predicts something else.
    alone, _ = model(idx[:, 13:14])
    assert not torch.allclose(alone[:, 0], full[:, 13], atol=1e-3)


def test_chunk_after_a_prefill_gives_every_position_of_the_full_pass() -> None:
    model = scrambled_gpt("modern")
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx, idx)
    cache = model.new_cache()
    model(idx[:, :4], cache=cache)
    chunk, _ = model(idx[:, 4:], idx[:, 4:], cache=cache)  # (B, 6, vocab): the causal mask inside the chunk
    torch.testing.assert_close(chunk, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_cache_refuses_positions_past_the_context() -> None:
    model = scrambled_gpt("gpt2", block_size=8)
    cache = model.new_cache()
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="6 cached \\+ 3 new positions exceed block_size 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.9, top_k=8), dict(temperature=1.3, top_p=0.8)],
)
def test_same_tokens_with_and_without_the_cache_within_and_past_the_context(recipe: str, sampling: dict) -> None:
    model = scrambled_gpt(recipe, block_size=8)
    prompt = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    runs = {
        use_cache: model.generate(
            prompt, 20, generator=torch.Generator().manual_seed(4), use_cache=use_cache, **sampling
        )
        for use_cache in (True, False)
    }
    assert runs[True].shape == (3, 25)  # 25 tokens: the 8-token context overflows after 3 of the 20
    assert torch.equal(runs[True], runs[False])
    assert torch.equal(runs[True][:, :5], prompt)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_past_the_context_each_token_follows_from_the_last_block_size_tokens(recipe: str) -> None:
    model = scrambled_gpt(recipe, block_size=8)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 12, temperature=0.0)
    for t in range(6, 18):
        window = out[:, max(0, t - 8) : t]  # what the model may see before token t
        logits, _ = model(window)
        assert torch.equal(out[:, t], logits[:, -1].argmax(dim=-1)), t


def test_within_the_context_the_cache_runs_each_position_once() -> None:
    model = scrambled_gpt("gpt2", block_size=32)
    positions = []
    model.transformer.wte.register_forward_hook(lambda module, inputs, output: positions.append(inputs[0].size(1)))
    prompt = torch.zeros(2, 4, dtype=torch.long)
    model.generate(prompt, 10, temperature=0.0, use_cache=True)
    assert positions == [4] + [1] * 9  # the prompt once, then one new position per token
    positions.clear()
    model.generate(prompt, 10, temperature=0.0, use_cache=False)
    assert positions == list(range(4, 14))  # every step reruns the whole sequence


@pytest.mark.parametrize(("recipe", "prompt_seed", "firsts"), [("gpt2", 8, [0, 5, 2]), ("modern", 7, [0, 5, 8])])
def test_a_row_that_produced_the_stop_token_pads_with_it_until_every_row_has(
    recipe: str, prompt_seed: int, firsts: list[int]
) -> None:
    model = scrambled_gpt(recipe, block_size=32)
    prompt = torch.randint(0, VOCAB, (3, 3), generator=torch.Generator().manual_seed(prompt_seed))
    free = model.generate(prompt, 10, generator=torch.Generator().manual_seed(9))[:, 3:].tolist()
    stop = free[0][0]
    assert [row.index(stop) for row in free] == firsts  # the rows produce it at different steps
    out = model.generate(prompt, 10, generator=torch.Generator().manual_seed(9), stop_token=stop)[:, 3:].tolist()
    new = max(firsts) + 1
    assert len(out[0]) == new  # generation ends once the last row has stopped
    for row, first, free_row in zip(out, firsts, free, strict=True):
        assert row[: first + 1] == free_row[: first + 1]  # the same tokens up to the stop
        assert row[first + 1 :] == [stop] * (new - first - 1)  # then only the stop token


def test_top_p_keeps_the_smallest_set_holding_that_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)  # (B, vocab): one draw per row
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, 1.0, None, 0.7, gen)[:, 0]
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 already holds 0.7
    assert counts[0] == pytest.approx(0.5 / 0.8, abs=0.03) and counts[1] == pytest.approx(0.3 / 0.8, abs=0.03)
    tiny = sample_next(logits[:50], 1.0, None, 1e-6, gen)[:, 0]
    assert (tiny == 0).all()  # a vanishing mass keeps the likeliest token only: greedy
    all_four = sample_next(logits, 1.0, None, 1.0, gen)[:, 0]
    assert set(all_four.tolist()) == {0, 1, 2, 3}
    top_k_then_p = sample_next(logits, 1.0, 3, 0.9, gen)[:, 0]  # top-k first: 0.5/0.95 + 0.3/0.95 < 0.9
    assert set(top_k_then_p.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
        (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ],
)
def test_bad_sampling_settings_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    model = scrambled_gpt("gpt2")
    settings = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **settings)


@pytest.fixture(scope="module")
def trained(one_torch_thread: None) -> GPT:
    """A tiny GPT trained on a Markov chain: its predictions are sharp, as a served model's are."""
    return builders.train_gpt(builders.markov_tokens(4000, 16), 16, steps=60)


def test_dynamic_int8_model_decodes_with_the_cache(trained: GPT) -> None:
    fast = to_dynamic_int8(trained)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cached = fast.generate(prompt, 30, temperature=0.0)  # past the 16-token context too
    assert cached.shape == (2, 33)
    # Activations are quantized per call, so one new position gets a scale of its own: the cached logits
    # match the full pass to int8 precision, not to the last bit, and greedy tokens the same.
    assert torch.equal(cached, fast.generate(prompt, 30, temperature=0.0, use_cache=False))
    assert torch.equal(cached, trained.generate(prompt, 30, temperature=0.0))


def test_decode_speed_is_reported_per_model(trained: GPT) -> None:
    speeds = decode_tokens_per_s({"fp32": trained, "int8": to_dynamic_int8(trained)}, torch.zeros(2, 4).long(), 8, 2)
    assert set(speeds) == {"fp32", "int8"} and all(s > 0 for s in speeds.values())
    with pytest.raises(ValueError, match="runs must be >= 1"):
        decode_tokens_per_s({"fp32": trained}, torch.zeros(1, 4).long(), 8, runs=0)


def test_gptflow_generate_passes_top_p_to_the_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = train_char(["abcdefghij klmnop"])
    model = scrambled_gpt("gpt2", block_size=32, vocab_size=tokenizer.vocab_size)
    monkeypatch.setattr(generate_task, "load_store_model", lambda store, which, device: (model, tokenizer, "m/v"))

    def sample(**kwargs) -> list[str]:
        settings = dict(max_new_tokens=20, temperature=1.0, top_k=None, num_samples=4, seed=1)
        return generate_task.generate_text("unused", "pretrain", "abc", **{**settings, **kwargs})

    greedy = sample(temperature=0.0)
    assert sample(top_p=1e-6) == greedy  # nucleus of the likeliest token only
    assert sample(top_p=None) != greedy
    assert len(set(sample(top_p=None))) > 1  # the unrestricted samples differ from row to row


def test_evaluate_stage_samples_still_run(trained: GPT) -> None:
    from tasks.evaluate import EvaluateConfig, sample_texts

    tokenizer = train_char(["abcdefghijklmn"])
    cfg = EvaluateConfig(prompts=["abc", "de"], max_new_tokens=8)
    samples = sample_texts(trained, tokenizer, cfg, torch.device("cpu"))
    assert [s["prompt"] for s in samples] == ["abc", "de"] and all(isinstance(s["completion"], str) for s in samples)


def test_quantize_stage_reports_decoding_speed_beside_latency(tmp_path, trained: GPT) -> None:
    import json

    from model.checkpoint import save_model
    from storage.store import Store
    from tasks.quantize import REPORT, QuantizeConfig
    from tasks.quantize import STAGE as QUANTIZE

    store = Store(tmp_path / "store")
    val = builders.markov_tokens(400, 16, seed=1)
    tokens = builders.publish_tokens(store.root, val, val, vocab_size=16, version="tok")
    store.publish("finetune", "ft", lambda out: save_model(out, trained), params={}, inputs={}, code_version="t")
    ref = QUANTIZE.run(
        store.root, QuantizeConfig(eval_tokens=200, latency_runs=1), {"finetune": "ft", "tokens": tokens}
    )
    report = json.loads((store.path("quantize", ref.version) / REPORT).read_text())
    assert report["latency_fp32_ms"] > 0 and report["latency_quantized_ms"] > 0  # the old fields stay
    assert report["decode_tokens_per_s_fp32"] > 0 and report["decode_tokens_per_s_quantized"] > 0
    assert report["decode_speedup"] == pytest.approx(
        report["decode_tokens_per_s_quantized"] / report["decode_tokens_per_s_fp32"]
    )
