"""`ecserve train`: the corpus split, the tokenizer, resumable batches, the training forward
(no future-token leakage; equal to the serving engine's steps over the same groups), resume
equal to an uninterrupted run, and the whole recipe on a tiny corpus and model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ecserve.cli import main
from ecserve.config import EngineConfig, ModelConfig
from ecserve.engine.engine import Engine
from ecserve.model.transformer import Transformer
from ecserve.train import bpe, corpus, presets
from ecserve.train.data import TrainBatches, Windows, validation_batches
from ecserve.train.forward import forward, token_nll
from ecserve.train.loop import TrainConfig, init_weights, train
from ecserve.types import Request, SamplingParams

STDLIB = corpus.stdlib_dir()
TINY_ARCH = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
             "ffn_hidden_size": 64, "num_experts": 4, "expert_ffn_hidden_size": 32}


def tiny_ec(vocab: int = 258, group_size: int = 8) -> ModelConfig:
    cfg = tiny_config(vocab_size=vocab, moe_layers=[1, 3],
                      routing={"policy": "ec", "group_size": group_size})
    return ModelConfig.from_dict(cfg)


def tiny_model(seed: int = 0, **kw) -> Transformer:
    model = Transformer(tiny_ec(**kw))
    init_weights(model, seed)
    return model


# ---------------------------------------------------------------- corpus and tokenizer


def test_corpus_split_is_by_whole_file_and_deterministic(tmp_path):
    root = tmp_path / "lib"
    for i in range(40):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"m{i}.py").write_text(f"x = {i}\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_text("no = 1\n")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")
    m = corpus.write_corpus(tmp_path / "c", root, valid_per_mille=200)
    again = corpus.write_corpus(tmp_path / "c2", root, valid_per_mille=200)
    assert m.sha256 == again.sha256 and m.skipped == ["latin1.py"]
    train, valid = (corpus.read_split(tmp_path / "c", s) for s in corpus.SPLITS)
    assert len(train) + len(valid) == 40 and 0 < len(valid) < 20
    assert not {d.path for d in train} & {d.path for d in valid}
    assert all(corpus.is_validation(d.path, 200) for d in valid)
    assert [d.path for d in train] == sorted(d.path for d in train)
    assert m.source == f"The .py files under {root}"


def test_bpe_encodes_any_text_and_counts_bytes(tmp_path):
    docs = [p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))]
    path = bpe.train_bpe(docs, 400, tmp_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    assert tok.token_to_id(bpe.BOS) == 0 and tok.token_to_id(bpe.EOS) == 1
    sizes = bpe.token_bytes(path)
    for text in ("def f(x):\n    return x\n", "ünïcødé ✓ 中文 \x00\t", "🙂" * 3):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert sum(sizes[i] for i in ids) == len(text.encode())
    assert bpe.file_sha256(bpe.train_bpe(docs, 400, tmp_path / "again")) == bpe.file_sha256(path)


def test_batches_are_a_pure_function_of_seed_and_step():
    stream = np.arange(5000, dtype=np.uint16)  # a window is told by its first token
    windows = Windows(stream, 16)
    a, b = TrainBatches(windows, 8, seed=3), TrainBatches(windows, 8, seed=3)
    steps = [0, 5, 70, 1, 31, 31, 200]  # across epochs, in any order (a resumed run jumps)
    for s in steps:
        assert torch.equal(a.batch(s), b.batch(s))
    first = a.batch(0)
    assert first.shape == (8, 17)
    # One epoch visits every window once.
    seen = torch.cat([a.batch(s)[:, 0] for s in range(a.per_epoch)])
    assert len(set(seen.tolist())) == a.per_epoch * 8
    assert not torch.equal(TrainBatches(windows, 8, seed=4).batch(0), first)
    assert len(validation_batches(windows, 8)) == windows.count // 8


# ---------------------------------------------------------------- the training forward


def test_no_future_token_leaks_into_earlier_positions():
    """Each group holds one position of several sequences: changing the tokens after t, in
    any sequence, leaves every sequence's logits at positions <= t unchanged."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 258, (16, 12), generator=gen)
    base = forward(model, ids, 8).logits.view(12, 16, -1)  # position-major
    t = 5
    changed = ids.clone()
    changed[3, t + 1:] = torch.randint(0, 258, (12 - t - 1,), generator=gen)
    changed[9, t + 3] = (changed[9, t + 3] + 1) % 258
    other = forward(model, changed, 8).logits.view(12, 16, -1)
    assert torch.equal(other[:t + 1], base[:t + 1])
    assert not torch.equal(other[t + 1:], base[t + 1:])


def test_a_group_may_not_span_two_tokens_of_one_sequence():
    with pytest.raises(ValueError, match="no group holds two tokens of one sequence"):
        forward(tiny_model(), torch.zeros(12, 4, dtype=torch.long), 8)


def test_training_forward_equals_the_engines_decode_groups(tmp_path):
    """The training grouping through the serving engine: B sequences scored one token per step
    (max_prefill_chunk=1, batch scope) form exactly the training groups, so the engine's prompt
    logprobs equal the training forward's (the reference row of bench_decode_policies)."""
    model = tiny_model(seed=1)
    from ecserve.model.weights import save_model

    save_model(tmp_path, model.cfg, model.state_dict())
    ids = torch.randint(0, 258, (8, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = token_nll(forward(model, ids[:, :-1], 8), ids[:, 1:]).view(19, 8).t()  # [B, T]
    engine = Engine(tmp_path, EngineConfig(device="cpu", max_num_seqs=8, max_prefill_chunk=1,
                                           record_steps=True))
    for b in range(8):
        engine.add_request(Request(f"s{b}", tuple(ids[b].tolist()),
                                   SamplingParams(max_new_tokens=1, prompt_logprobs=0)))
    got = torch.zeros(8, 19)
    while engine.has_unfinished():
        for ev in engine.step():
            b = int(ev.request_id[1:])
            got[b] = torch.tensor([-lp for lp, _ in ev.prompt_logprobs[1:]])
    assert {r.stats.plan.group_sizes for r in engine.records} == {(8,)}
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


# ---------------------------------------------------------------- the loop


def _run(tmp_path: Path, steps: int, max_now: int | None, name: str):
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=16, group_size=8, lr=1e-2,
                      warmup_steps=2, compile=False, eval_every=2, eval_batches=1,
                      checkpoint_every=100)
    stream = (np.arange(20000) * 7 % 251).astype(np.uint16)
    batches = TrainBatches(Windows(stream, 16), 8, seed=0)
    valid = validation_batches(Windows(stream[:2000], 16), 8)
    model_cfg = tiny_ec()
    return train(model_cfg, cfg, batches, valid, torch.ones(258, dtype=torch.long),
                 tmp_path / f"{name}.pt", torch.device("cpu"), {"run": name}, max_now)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole, ws = _run(tmp_path, 6, None, "whole")
    part, ps = _run(tmp_path, 6, 4, "split")
    assert ps.step == 4
    part, ps = _run(tmp_path, 6, None, "split")  # the second sitting
    assert ps.step == ws.step == 6
    for (name, a), (_, b) in zip(whole.state_dict().items(), part.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in ps.history] == [h["loss"] for h in ws.history]
    assert ws.history[-1]["loss"] < ws.history[0]["loss"]  # it learns
    assert set(ws.thresholds) == {1, 3} and all(len(v) == 4 for v in ws.thresholds.values())
    assert "valid" in ws.history[1] and "valid" in ws.history[-1]
    with pytest.raises(ValueError, match="from a different run"):
        train(tiny_ec(), TrainConfig(steps=6), None, [], torch.ones(1), tmp_path / "whole.pt",
              torch.device("cpu"), {"run": "other"})


# ---------------------------------------------------------------- the whole recipe


def test_the_recipe_writes_a_model_the_engine_serves(tmp_path, monkeypatch):
    root = tmp_path / "src"
    shutil.copytree(STDLIB / "json", root / "json")
    shutil.copytree(STDLIB / "asyncio", root / "asyncio")  # two of its files are held out
    monkeypatch.setattr(presets, "ARCH", TINY_ARCH)
    argv = ["train", "--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"),
            "--corpus-root", str(root), "--vocab-size", "320", "--tokens", "6000",
            "--seq-len", "32", "--batch-size", "16", "--group-size", "16", "--warmup-steps", "2",
            "--no-compile"]
    assert main([*argv, "--max-steps-now", "5"]) == 0  # a first sitting
    assert not (tmp_path / "model").exists()
    assert main(argv) == 0  # resumed to the end, then exported
    out = tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "training.json"]
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 12 and len(record["history"]) == 12
    assert record["recipe"].startswith("ecserve train --out ")
    card = (out / "README.md").read_text()
    assert f"| {record['held_out']['nats_per_token']:.4f} |" in card
    assert record["tokenizer"]["sha256"] in card and record["corpus"]["sha256"]["train"] in card
    assert record["corpus"]["files"]["valid"] == 2
    # The exported directory serves, under its own policy and with the calibrated thresholds.
    for policy in (None, "threshold", "ec"):
        engine = Engine(out, EngineConfig(device="cpu", routing_policy=policy))
        assert engine.model_cfg.routing.policy == (policy or presets.SERVING_POLICY)
        engine.add_request(Request("x", tuple(engine.encode("def f(")),
                                   SamplingParams(max_new_tokens=4)))
        while engine.has_unfinished():
            engine.step()
        assert engine.last_stats is not None
    theta = record["thresholds"]["calibrated"]
    assert set(theta) == {"1"} and all(0 < t < 1 for t in theta["1"])
