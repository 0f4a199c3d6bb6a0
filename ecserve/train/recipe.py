"""`ecserve train`: the whole recipe, from the stdlib source to a complete model directory.

Stages, each kept in the work directory and reused by a rerun (so a run may span sittings):
corpus/ (the extracted text), tokenizer-V/ (the BPE), tokens-V-{train,valid}.npy (the token
streams), run-NAME/checkpoint.pt (the training state). The model directory written at the end
holds config.json, model.safetensors, tokenizer.json, training.json (the recipe, the loss curve)
and README.md (the model card).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ecserve.errors import ConfigError
from ecserve.train import bpe, corpus
from ecserve.train.data import TrainBatches, Windows, encode_stream, validation_batches
from ecserve.train.export import export
from ecserve.train.loop import TrainConfig, train
from ecserve.train.options import TrainOptions
from ecserve.train.presets import model_config

log = logging.getLogger(__name__)

# TrainConfig fields that say how a run executes, not what it trains: resuming ignores them.
OPERATIONAL = ("compile", "eval_every", "eval_batches", "checkpoint_every")


def run(args: TrainOptions, argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    work: Path = args.work
    manifest = _corpus(work / "corpus", args.corpus_root)
    tok_path = _tokenizer(work, args.vocab_size)
    train_stream, valid_stream = (_tokens(work, tok_path, args.vocab_size, s)
                                  for s in corpus.SPLITS)
    steps = max(1, round(args.tokens / (args.batch_size * args.seq_len)))
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      group_size=args.group_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      seed=args.seed, autocast="none" if args.precision == "float32"
                      else "bfloat16", compile=args.compile)
    model_cfg = model_config(args.preset, args.vocab_size, args.seq_len, args.group_size)
    name = args.name or f"{args.preset}-v{args.vocab_size}-t{steps * cfg.tokens_per_step}"
    run_dir = work / f"run-{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    # What makes a run the same run (resuming checks it): not how it is executed or logged.
    recipe_fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in OPERATIONAL}
    meta = {"model": json.loads(json.dumps(model_cfg.to_dict())),
            "train": json.loads(json.dumps(recipe_fields)),
            "corpus": manifest.sha256, "tokenizer": bpe.file_sha256(tok_path)}
    token_bytes = torch.tensor(bpe.token_bytes(tok_path))
    valid = validation_batches(Windows(valid_stream, args.seq_len), args.batch_size)
    batches = TrainBatches(Windows(train_stream, args.seq_len), args.batch_size, args.seed)
    log.info("%s: %d steps of %d tokens (%.2f epochs of %d training tokens) on %s", name,
             steps, cfg.tokens_per_step, batches.epoch_of(steps), len(train_stream), device)
    model, state = train(model_cfg, cfg, batches, valid, token_bytes,
                         run_dir / "checkpoint.pt", device, meta, args.max_steps_now)
    if state.step < cfg.steps:
        log.info("stopped at step %d of %d; rerun the same command to resume", state.step,
                 cfg.steps)
        return 0
    export(args.out, model, state, cfg, args.preset, tok_path, manifest, valid, token_bytes,
           batches, recipe="ecserve " + shlex.join(argv), device=device)
    return 0


def _corpus(out: Path, root: Path | None) -> corpus.CorpusManifest:
    if (out / corpus.MANIFEST).is_file():
        m = corpus.read_manifest(out)
        if root is not None and Path(m.stdlib) != root.resolve():
            raise ConfigError(f"{out} holds a corpus of {m.stdlib}, not {root}: use another "
                             "--work directory")
        log.info("corpus (kept): %s\n%s", m.python, m.describe())
        return m
    m = corpus.write_corpus(out, root.resolve() if root else None)
    log.info("corpus: %s, %s\n%s", m.python, m.stdlib, m.describe())
    return m


def _tokenizer(work: Path, vocab_size: int) -> Path:
    path = work / f"tokenizer-{vocab_size}" / bpe.TOKENIZER_FILE
    if not path.is_file():
        t0 = time.perf_counter()
        docs = corpus.read_split(work / "corpus", "train")
        bpe.train_bpe((d.text for d in docs), vocab_size, path.parent)
        log.info("tokenizer: BPE %d trained in %.1f s, sha256 %s", vocab_size,
                 time.perf_counter() - t0, bpe.file_sha256(path))
    return path


def _tokens(work: Path, tok_path: Path, vocab_size: int, split: str) -> np.ndarray:
    path = work / f"tokens-{vocab_size}-{split}.npy"
    if not path.is_file():
        stream = encode_stream(corpus.read_split(work / "corpus", split), tok_path, 0, 1)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, stream)
        os.replace(tmp, path)
    return np.load(path)
