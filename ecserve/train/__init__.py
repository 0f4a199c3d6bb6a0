"""Training expert-choice models with the serving code: `ecserve train` (recipe.py).

corpus.py (the stdlib text, split by file) -> bpe.py (the tokenizer) -> data.py (token streams,
resumable batches) -> forward.py (the training forward over the serving modules, one token per
sequence in every routing group) -> loop.py (AdamW, schedule, checkpoints) -> export.py (the
model directory, the threshold calibration, the model card). presets.py holds each --preset's
ModelConfig, trained and served, which recipe.py and export.py both read.
"""
