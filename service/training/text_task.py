"""Train a byte-level language model on the standard-library corpus.

Training is stateful truncated BPTT: the training bytes are cut into `batch_size` contiguous
tracks, each step reads the next `seq_len` bytes of every track, and the recurrent state is
carried (detached) from one step to the next. The server feeds a session's bytes one chunk at a
time from one long-lived state, so this is the regime the model must be good at. Data order is
fixed: nothing random but the initial weights.

Validation is bits per byte on the held-out files, read the same stateful way; the baseline is
the train set's unigram byte distribution scored on the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.errors import InvalidArgument
from service.models import ByteTokenizer, ModelConfig, RecurrentState, SequenceModel
from service.training.text_corpus import TextCorpus, load_text_corpus, unigram_bits_per_byte
from service.training.trainer import (
    TrainOptions,
    TrainResult,
    export_state_dict,
    run_steps,
    seed_everything,
)

VOCAB = ByteTokenizer.vocab_size
# Validation reads the held-out bytes as this many parallel tracks, in chunks of EVAL_CHUNK.
EVAL_TRACKS = 16
EVAL_CHUNK = 512


class ByteTracks:
    """The training bytes as `batch` contiguous tracks, read `seq_len` at a time, wrapping."""

    def __init__(self, data: np.ndarray, batch: int, seq_len: int) -> None:
        length = data.size // batch
        if length < seq_len + 1:
            raise InvalidArgument(
                f"{data.size} training bytes cannot fill {batch} tracks of {seq_len + 1}"
            )
        self.tracks = torch.from_numpy(data[: batch * length].astype(np.int64)).view(batch, length)
        self.seq_len = seq_len
        self.position = 0

    def next(self) -> tuple[Tensor, Tensor, bool]:
        """→ (inputs [B, T], targets [B, T], wrapped: the tracks restarted, so reset state)."""
        wrapped = self.position + self.seq_len + 1 > self.tracks.shape[1]
        if wrapped:
            self.position = 0
        p, t = self.position, self.seq_len
        self.position += t
        return self.tracks[:, p : p + t], self.tracks[:, p + 1 : p + t + 1], wrapped


def text_model_config(options: TrainOptions) -> ModelConfig:
    return ModelConfig(
        cell=options.cell,
        num_layers=options.num_layers,
        hidden_size=options.hidden_size,
        input_kind="tokens",
        input_dim=VOCAB,
        embed_dim=options.embed_dim,
        head_kind="classification",
        output_dim=VOCAB,
        reset_after=options.reset_after,
    )


@torch.no_grad()
def bits_per_byte(model: SequenceModel, data: np.ndarray, tracks: int = EVAL_TRACKS) -> float:
    """Mean cross-entropy (bits) of predicting each byte of `data` from the bytes before it.

    `data` is read as `tracks` contiguous tracks, each from a zero state; each track's first
    byte (no context) and the < `tracks` bytes that do not fill a track are not scored.
    """
    model.eval()
    length = data.size // tracks
    assert length >= 2, f"{data.size} bytes are too few for {tracks} tracks"
    stream = torch.from_numpy(data[: tracks * length].astype(np.int64)).view(tracks, length)
    state: RecurrentState | None = None
    total_nats, count = 0.0, 0
    for start in range(0, length - 1, EVAL_CHUNK):
        end = min(start + EVAL_CHUNK, length - 1)
        logits, state = model(stream[:, start:end], state)  # [B, T, V]
        targets = stream[:, start + 1 : end + 1]  # [B, T]
        total_nats += float(
            F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum")
        )
        count += targets.numel()
    return total_nats / count / math.log(2)


def train_text(
    options: TrainOptions,
    corpus: TextCorpus | None = None,
    progress: bool = True,
    max_eval_bytes: int | None = None,
) -> TrainResult:
    """Train a byte LM; validation is scored on the first `max_eval_bytes` held-out bytes
    (all of them by default)."""
    corpus = load_text_corpus() if corpus is None else corpus
    validation = corpus.validation if max_eval_bytes is None else corpus.validation[:max_eval_bytes]
    if validation.size < 2 * EVAL_TRACKS:
        raise InvalidArgument(f"validation needs at least {2 * EVAL_TRACKS} bytes")
    seed_everything(options.seed)
    config = text_model_config(options)
    model = SequenceModel(config)
    batches = ByteTracks(corpus.train, options.batch_size, options.seq_len)
    carried: list[RecurrentState | None] = [None]

    def step_loss(step: int) -> Tensor:
        inputs, targets, wrapped = batches.next()
        state = None if wrapped else carried[0]
        logits, new_state = model(inputs, state)  # [B, T, V]
        carried[0] = RecurrentState(
            new_state.h.detach(), None if new_state.c is None else new_state.c.detach()
        )
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    final_loss = run_steps(model, step_loss, options.steps, options.lr, progress, unit="nats")
    bpb = bits_per_byte(model, validation)
    baseline = unigram_bits_per_byte(corpus.train, validation)
    arch = f"{options.num_layers}x{options.hidden_size} {options.cell.upper()}"
    return TrainResult(
        config=config,
        state_dict=export_state_dict(model),
        description=(
            f"Byte-level {arch} language model (UTF-8 bytes, embed {options.embed_dim}) over "
            "Python standard-library source. Validation: bits per byte on held-out files; "
            "baseline: the train set's unigram byte distribution (add-one smoothed). "
            "final_loss: train cross-entropy in nats/byte, mean of the last 10% of steps."
        ),
        data=corpus.describe() + f"; validation scored on {validation.size} bytes",
        final_loss=final_loss,
        validation={"bits_per_byte": bpb},
        baselines={"bits_per_byte": baseline},
    )
