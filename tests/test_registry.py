"""The model registry: aliases moved atomically, an append-only promotion log, the champion gate across runs
(the first promotes itself, a worse one is rejected with its reason, a better one replaces the champion, a
guard that regresses rejects), gc keeping the champion, and `gptflow models`."""

import json
import math
import os
from pathlib import Path

import builders
import numpy as np
import pytest

from flows.cli import main
from model.checkpoint import save_model
from model.finetune import PROMPT_TEMPLATE
from model.gpt import GPT
from model.tokenizer import train_bpe, train_char
from storage.errors import TransientError
from storage.registry import CHALLENGER, CHAMPION, LOG, PROMOTED, REJECTED, FrozenSet, Registry
from storage.store import Store
from tasks.evaluate import REPORT_JSON, REPORT_MD, EvaluateConfig, PromotionConfig, decide
from tasks.evaluate import STAGE as EVALUATE
from tasks.quantize import STAGE as QUANTIZE
from tasks.quantize import QuantizeConfig

TEXT = "the cat sat on the mat. a dog ran to the cat. "
HELDOUT = [{"prompt": "the cat", "response": " sat on the mat."}, {"prompt": "a dog", "response": " ran to the cat."}]
# Responses that run against the text: a model that learned the text well is surer, and so more wrong, on them.
REVERSED = [{"prompt": p["prompt"], "response": p["response"][::-1]} for p in HELDOUT]
# What the test models learn: the text, and the held-out pairs as fine-tuning lays them out.
TRAIN_TEXT = TEXT + "".join(PROMPT_TEMPLATE.format(prompt=p["prompt"]) + p["response"] + "\n" for p in HELDOUT)
CHAR = train_char([TRAIN_TEXT])


# -- the registry on its own ------------------------------------------------------------------------------


def decision(challenger: str, verdict: str = PROMOTED, champion: str | None = None) -> dict:
    """A decision as evaluate commits it, made by an evaluation of its own."""
    return {
        "decision": verdict,
        "challenger": challenger,
        "champion": champion,
        "reason": f"{verdict} for the test",
        "metrics": {},
        "frozen_set": "f0",
        "evaluate_version": f"eval-{challenger.replace('/', '-')}",
    }


FROZEN = FrozenSet.make(["one document", "and another"], HELDOUT, {"tokens": "tok"})


def test_a_crash_between_writing_and_renaming_an_alias_leaves_the_old_one(tmp_path, monkeypatch):
    registry = Registry(tmp_path)
    registry.commit(decision("pretrain/a"), expected_seq=None, frozen=FROZEN)
    real_replace = os.replace

    def crash_on(name: str):
        def replace(src, dst):
            if Path(dst).name == f"{name}.json":
                raise OSError("killed between writing and renaming")
            return real_replace(src, dst)

        return replace

    # Killed renaming the challenger alias, which commits a decision: nothing of it took effect.
    monkeypatch.setattr(os, "replace", crash_on(CHALLENGER))
    with pytest.raises(OSError, match="killed"):
        registry.commit(decision("pretrain/b", champion="pretrain/a"), expected_seq=1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert registry.alias(CHAMPION)["model"] == registry.alias(CHALLENGER)["model"] == "pretrain/a"
    assert len(registry.history()) == 1
    assert not [p.name for p in (registry.root / "aliases").iterdir() if p.suffix != ".json"]  # no temp left

    # Killed renaming the champion alias after the decision was committed: the old champion is still whole
    # and read as the champion, and the next writer completes the promotion (and its log line).
    monkeypatch.setattr(os, "replace", crash_on(CHAMPION))
    with pytest.raises(OSError, match="killed"):
        registry.commit(decision("pretrain/b", champion="pretrain/a"), expected_seq=1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert registry.alias(CHAMPION)["model"] == "pretrain/a"
    assert registry.alias(CHALLENGER)["model"] == "pretrain/b" and len(registry.history()) == 1
    registry.record([])
    assert registry.alias(CHAMPION)["model"] == "pretrain/b" and registry.alias(CHAMPION)["previous"] == "pretrain/a"
    assert [d["challenger"] for d in registry.history()] == ["pretrain/a", "pretrain/b"]


def test_the_promotion_log_is_append_only_fsynced_and_survives_a_torn_line(tmp_path, monkeypatch):
    registry = Registry(tmp_path)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = registry.root / LOG
    registry.commit(decision("pretrain/a"), expected_seq=None, frozen=FROZEN)
    assert str(log) in synced
    snapshots = [log.read_bytes()]
    registry.commit(decision("pretrain/b", REJECTED, "pretrain/a"), expected_seq=1)
    snapshots.append(log.read_bytes())
    with open(log, "ab") as f:  # a writer killed mid-append
        f.write(b'{"seq": 3, "decision": "prom')
    assert [d["seq"] for d in registry.history()] == [1, 2]  # the torn line is no decision
    registry.commit(decision("pretrain/c", champion="pretrain/a"), expected_seq=1)
    snapshots.append(log.read_bytes())
    for before, after in zip(snapshots, snapshots[1:], strict=False):
        assert after.startswith(before)  # never rewritten: only appended to
    lines = [json.loads(line) for line in snapshots[-1].splitlines()]
    assert [(d["seq"], d["decision"], d["challenger"]) for d in lines] == [
        (1, PROMOTED, "pretrain/a"),
        (2, REJECTED, "pretrain/b"),
        (3, PROMOTED, "pretrain/c"),
    ]
    assert lines[1]["reason"] == "rejected for the test"


def test_a_decision_judged_against_a_champion_that_moved_is_refused(tmp_path):
    registry = Registry(tmp_path)
    registry.commit(decision("pretrain/a"), expected_seq=None, frozen=FROZEN)
    # A second run that also found no champion, and one that judged against a champion since replaced.
    with pytest.raises(TransientError, match="the champion is now pretrain/a"):
        registry.commit(decision("pretrain/x"), expected_seq=None)
    registry.commit(decision("pretrain/b", champion="pretrain/a"), expected_seq=1)
    with pytest.raises(TransientError, match="must be judged again"):
        registry.commit(decision("pretrain/y", champion="pretrain/a"), expected_seq=1)
    # The same evaluation committed again (a retry after a crash) is not a second decision.
    again = registry.commit(decision("pretrain/b", champion="pretrain/a"), expected_seq=1)
    assert again["seq"] == 2 and len(registry.history()) == 2
    assert registry.alias(CHAMPION)["model"] == "pretrain/b"
    assert registry.frozen(FROZEN.id).documents == FROZEN.documents


def test_gptflow_models_lists_the_champion_and_every_decision(tmp_path, capsys):
    registry = Registry(tmp_path)
    first = {**decision("pretrain/a"), "metrics": {"challenger": {"bits_per_byte": 1.5}, "champion": None}}
    second = {
        **decision("finetune/b", REJECTED, "pretrain/a"),
        "reason": "bits_per_byte 1.6000 is no better than the champion's 1.5000",
        "metrics": {"challenger": {"bits_per_byte": 1.6}, "champion": {"bits_per_byte": 1.5}},
    }
    registry.commit({**first, "frozen_set": FROZEN.id}, expected_seq=None, frozen=FROZEN)
    registry.commit({**second, "frozen_set": FROZEN.id}, expected_seq=1)
    assert main(["models", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("champion  pretrain/a  (decision 1, ")
    assert out[1] == f"frozen evaluation set {FROZEN.id}: 2 documents, 23 bytes, 2 held-out pairs (from tokens/tok)"
    assert out[3].split() == ["#", "at", "decision", "challenger", "against", "metric", "reason"]
    assert out[4].split()[2:] == [
        "promoted",
        "pretrain/a",
        "-",
        "bits_per_byte",
        "1.5000",
        "vs",
        "-",
        "promoted",
        "for",
        "the",
        "test",
    ]
    assert out[5].split()[2:8] == ["rejected", "finetune/b", "pretrain/a", "bits_per_byte", "1.6000", "vs"]
    assert out[5].endswith("  bits_per_byte 1.6000 is no better than the champion's 1.5000")


def publish(store: Store, stage: str, version: str, **inputs: str) -> None:
    store.publish(
        stage,
        version,
        lambda out: (out / "model.pt").write_bytes(version.encode()),
        params={},
        inputs=inputs,
        code_version="c",
    )


def test_gc_keeps_the_champion_and_its_lineage_and_removes_an_old_unaliased_version(tmp_path):
    store = Store(tmp_path)
    publish(store, "tokens", "tok")
    publish(store, "pretrain", "p-old", tokens="tok")
    publish(store, "pretrain", "p1", tokens="tok")
    publish(store, "finetune", "f1", pretrain="p1")
    publish(store, "pretrain", "p2", tokens="tok")
    publish(store, "finetune", "f2", pretrain="p2")  # the latest pretrain and finetune are p2 and f2
    registry = Registry(tmp_path)
    registry.commit(decision("finetune/f1"), expected_seq=None, frozen=FROZEN)
    registry.commit(decision("finetune/f2", REJECTED, "finetune/f1"), expected_seq=1)
    assert store.gc(keep_runs=0) == ["pretrain/p-old"]
    assert (store.path("finetune", "f1") / "model.pt").read_bytes() == b"f1"  # the champion, and what made it
    assert store.has("pretrain", "p1") and store.has("tokens", "tok")


# -- the champion gate across runs ------------------------------------------------------------------------


def trained(steps: int, tokenizer=CHAR) -> GPT:
    tokens = np.array(tokenizer.encode(TRAIN_TEXT * 10), dtype=np.uint16)
    return builders.train_gpt(tokens, tokenizer.vocab_size, steps=steps, block_size=32, batch_size=8)


def publish_run(root: Path, tag: str, model: GPT, tokenizer=CHAR, heldout=HELDOUT) -> dict[str, str]:
    """One run's inputs of evaluate: its tokenizer and tokens (shared by runs of one tokenizer), and its
    model as pretrained, fine-tuned and quantized versions of its own."""
    store = Store(root)
    tk, tok = f"tk-{tokenizer.kind}", f"tok-{tokenizer.kind}"
    store.publish(
        "tokenizer", tk, lambda out: tokenizer.save(out / "tokenizer.json"), params={}, inputs={}, code_version="t"
    )
    builders.publish_tokens(
        root,
        tokenizer.encode(TEXT * 30),
        tokenizer.encode(TEXT * 4),
        vocab_size=tokenizer.vocab_size,
        eot_token=tokenizer.eot_id,
        version=tok,
        inputs={"tokenizer": tk},
        tokenizer=tokenizer,
        tokenizer_version=tk,
    )

    def build(out: Path) -> None:
        save_model(out, model)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "train_loss": 3.0}) + "\n")
        (out / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in heldout))

    store.publish("pretrain", f"pre-{tag}", build, params={"tag": tag}, inputs={"tokens": tok}, code_version="t")
    store.publish("finetune", f"fin-{tag}", build, params={}, inputs={"pretrain": f"pre-{tag}"}, code_version="t")
    quantized = QUANTIZE.run(
        root, QuantizeConfig(latency_runs=1, eval_tokens=64), {"finetune": f"fin-{tag}", "tokens": tok}
    )
    return {
        "tokens": tok,
        "tokenizer": tk,
        "pretrain": f"pre-{tag}",
        "finetune": f"fin-{tag}",
        "quantize": quantized.version,
    }


def cfg(**promotion) -> EvaluateConfig:
    return EvaluateConfig(prompts=["the "], max_new_tokens=4, promotion=PromotionConfig(**promotion))


def evaluate(root: Path, inputs: dict[str, str], settings: EvaluateConfig | None = None) -> tuple[dict, str]:
    ref = EVALUATE.run(root, settings or cfg(), inputs)
    folder = Store(root).path("evaluate", ref.version)
    return json.loads((folder / REPORT_JSON).read_text()), (folder / REPORT_MD).read_text()


@pytest.fixture(scope="module")
def models(one_torch_thread: None) -> dict[str, GPT]:
    return {"fair": trained(30), "worse": trained(0), "better": trained(150)}


@pytest.mark.slow  # three trained models, and an evaluation a run
def test_the_first_promotes_itself_a_worse_is_rejected_a_better_promoted(tmp_path, models, capsys):
    root = tmp_path / "store"
    registry = Registry(root)
    assert main(["models", "--storage", str(root)]) == 0
    assert "no model judged yet" in capsys.readouterr().out

    first, markdown = evaluate(root, publish_run(root, "1", models["fair"]))
    promotion = first["promotion"]
    assert promotion["decision"] == PROMOTED and promotion["champion"] is None
    assert "the first champion" in promotion["reason"]
    champion = promotion["challenger"]
    assert registry.alias(CHAMPION)["model"] == champion and promotion["champion_after"] == champion
    frozen = registry.frozen(promotion["frozen_set"]["id"])
    assert "".join(frozen.documents) == TEXT * 4 and list(frozen.heldout) == HELDOUT
    assert f"**promoted**: **{champion}** is the champion" in markdown
    first_evaluation = Store(root).latest("evaluate")

    worse, markdown = evaluate(root, publish_run(root, "2", models["worse"]))
    promotion = worse["promotion"]
    assert promotion["decision"] == REJECTED and promotion["champion"] == champion
    assert "is no better than the champion's" in promotion["reason"]
    chal, champ = promotion["metrics"]["challenger"], promotion["metrics"]["champion"]
    assert chal["bits_per_byte"] > champ["bits_per_byte"]
    assert registry.alias(CHAMPION)["model"] == champion  # unchanged
    assert registry.alias(CHALLENGER)["model"] == promotion["challenger"]
    assert f"**rejected**: the champion stays **{champion}** ({promotion['reason']})" in markdown
    assert f"| {champion} | champion | {champ['bits_per_byte']:.4f} |" in markdown

    # The latest versions are the second run's now, and no run record names the first's: gc removes what
    # nothing names (the first evaluation) and keeps the champion, which the next run must load.
    assert Store(root).gc(keep_runs=0) == [f"evaluate/{first_evaluation}"]
    assert Store(root).damage(*champion.split("/")) is None

    better, _ = evaluate(root, publish_run(root, "3", models["better"]))
    promotion = better["promotion"]
    assert promotion["decision"] == PROMOTED and promotion["champion"] == champion
    assert "bits_per_byte improves by" in promotion["reason"] and "guards: heldout_bits_per_byte" in promotion["reason"]
    new_champion = promotion["challenger"]
    assert registry.alias(CHAMPION)["model"] == new_champion != champion
    assert registry.alias(CHAMPION)["frozen_set"] == frozen.id  # the frozen set does not move with the champion

    history = registry.history()
    assert [(d["decision"], d["challenger"], d["champion"]) for d in history] == [
        (PROMOTED, champion, None),
        (REJECTED, worse["promotion"]["challenger"], champion),
        (PROMOTED, new_champion, champion),
    ]
    assert history[1]["reason"] == worse["promotion"]["reason"]  # a rejected challenger keeps its reason
    record = registry.model(*new_champion.split("/"))
    assert record["data_version"] == "tok-char" and record["tokenizer_version"] == "tk-char"
    assert record["frozen_metrics"] == promotion["metrics"]["challenger"] and record["config_hash"]

    assert main(["models", "--storage", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"champion  {new_champion}  (decision 3,")
    assert f"frozen evaluation set {frozen.id}: 1 documents" in out[1]
    rows = [line.split() for line in out[4:]]
    assert [(row[0], row[2], row[3], row[4]) for row in rows] == [
        ("1", PROMOTED, champion, "-"),
        ("2", REJECTED, worse["promotion"]["challenger"], champion),
        ("3", PROMOTED, new_champion, champion),
    ]
    assert out[5].endswith(worse["promotion"]["reason"])


@pytest.mark.slow  # three trained models, and an evaluation a run
def test_a_guard_that_regresses_rejects_a_challenger_that_improves(tmp_path, models):
    root = tmp_path / "store"
    # The frozen held-out responses run against the text: the better-trained model is more wrong on them.
    evaluate(root, publish_run(root, "1", models["fair"], heldout=REVERSED))
    inputs = publish_run(root, "3", models["better"], heldout=REVERSED)
    report, _ = evaluate(root, inputs)
    promotion = report["promotion"]
    chal, champ = promotion["metrics"]["challenger"], promotion["metrics"]["champion"]
    assert chal["bits_per_byte"] < champ["bits_per_byte"] - 0.5  # far better on the documents
    assert promotion["decision"] == REJECTED
    assert promotion["reason"].startswith("guard heldout_bits_per_byte gets worse by")
    assert Registry(root).alias(CHAMPION)["model"] == promotion["champion"]
    # Without the guard, the same challenger is promoted.
    report, _ = evaluate(root, inputs, cfg(guards={}))
    assert report["promotion"]["decision"] == PROMOTED


@pytest.mark.slow  # three trained models, and an evaluation a run
def test_a_champion_of_another_tokenizer_is_scored_on_the_same_text(tmp_path, models, one_torch_thread):
    root = tmp_path / "store"
    evaluate(root, publish_run(root, "1", models["fair"]))
    bpe = train_bpe([TRAIN_TEXT * 30], vocab_size=300)
    inputs = publish_run(root, "b", trained(150, tokenizer=bpe), tokenizer=bpe)
    # A gate on a per-token loss cannot compare them, and says so.
    report, _ = evaluate(root, inputs, cfg(metric="val_loss"))
    assert report["promotion"]["decision"] == REJECTED
    assert report["promotion"]["reason"].startswith("val_loss is per token of two different tokenizers")
    report, markdown = evaluate(root, inputs)
    promotion = report["promotion"]
    chal, champ = promotion["metrics"]["challenger"], promotion["metrics"]["champion"]
    assert promotion["same_tokenizer"] is False and chal["scored_tokens"] < champ["scored_tokens"] / 2
    # Both per-byte numbers divide by the same bytes: the frozen documents' text.
    text_bytes = promotion["frozen_set"]["text_bytes"]
    for scores in (chal, champ):
        assert scores["bits_per_byte"] == pytest.approx(
            scores["val_loss"] * scores["scored_tokens"] / math.log(2) / text_bytes
        )
    assert promotion["decision"] == PROMOTED and chal["bits_per_byte"] < champ["bits_per_byte"]
    assert "two different tokenizers: compare per byte only" in markdown


# -- the decision rule ------------------------------------------------------------------------------------


def scores(bpb: float, heldout_bpb: float | None = 1.0, loss: float = 1.0) -> dict:
    return {"bits_per_byte": bpb, "val_loss": loss, "heldout_bits_per_byte": heldout_bpb, "heldout_loss": loss}


def test_the_gate_needs_the_margin_and_every_guard() -> None:
    gate = PromotionConfig(min_improvement=0.01, guards={"heldout_bits_per_byte": 0.05})
    assert decide(scores(0.98), scores(1.0), gate, True)[0] == PROMOTED
    verdict, reason = decide(scores(0.995), scores(1.0), gate, True)
    assert (
        verdict == REJECTED
        and reason == "bits_per_byte improves by 0.0050 (1.0000 -> 0.9950), less than min_improvement 0.01"
    )
    assert decide(scores(1.0), scores(1.0), PromotionConfig(min_improvement=0.0), True)[0] == REJECTED  # a tie
    verdict, reason = decide(scores(0.9, heldout_bpb=1.06), scores(1.0), gate, True)
    assert verdict == REJECTED
    assert reason == "guard heldout_bits_per_byte gets worse by 0.0600 (1.0000 -> 1.0600), more than its tolerance 0.05"
    assert decide(scores(0.9, heldout_bpb=1.04), scores(1.0), gate, True)[0] == PROMOTED
    # No held-out pairs on either side: the guard has nothing to judge, and says so.
    verdict, reason = decide(scores(0.9, None), scores(1.0, None), gate, True)
    assert verdict == PROMOTED and "heldout_bits_per_byte not scored" in reason
    with pytest.raises(ValueError, match="guards.heldout_loss: tolerance -0.1 is not >= 0"):
        PromotionConfig(guards={"heldout_loss": -0.1})
