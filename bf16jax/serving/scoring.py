"""Evaluation-only mode: a serving artifact or a training run -> held-out quality as JSON.

`python -m bf16jax.evaluate --artifact=DIR` (or `--config=... --workdir=...`) prints loss,
accuracy, perplexity, ECE and confidence on the clean eval split and under every shift of the
dataset (`bf16jax.evaluation.shifts`), and the agreement of its predictions with an FP32 reference
on the
same examples. Invariants:

- a `Scorer` turns either source into what `bf16jax.evaluation.heldout` needs (`config`,
  `eval_batches`, `predict`), so artifacts and runs are scored by the same code, batch by batch,
  on identical (seeded) shifted inputs;
- a run evaluated at a serving precision runs the very program that `bf16jax.serving.export` would
  serialize (`inference.Programs.score`), so its figures equal the artifact's;
- the FP32 reference is `--reference` (an artifact), else the checkpoint the artifact names
  in its manifest, served at fp32 (the same params, `precision.fp32_reference`);
- the data is the model's own training data (`resolve_data`: a prepared dataset rewritten since,
  or a config naming other data, is refused) unless `--data=DIR` names another prepared set, and
  every report says which (`report["data"]`);
- packed rows (segment ids) are scored one document per row, as the model saw them in training.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from bf16jax.data import provenance
from bf16jax.evaluation import calibration as metrics_lib
from bf16jax.evaluation import heldout as evaluation
from bf16jax.serving import inference, segments
from bf16jax.serving.artifact import Artifact

__all__ = [
    "Scorer",
    "evaluate",
    "report_json",
    "resolve_data",
    "data_line",
    "trained_data",
    "TRAIN_PRECISION",
]

log = logging.getLogger(__name__)
TRAIN_PRECISION = inference.TRAIN  # evaluate a run under its own training policy


class Scorer:
    """Held-out predictions of one model: a loaded artifact or a run's params + precision.

    Args:
      config: the run's config (data and eval settings are read).
      logits_fn: the score program, called on padded arrays (see `inference.Programs.score`).
      limits: the program's fixed lengths (`manifest["limits"]`).
      description: what this is (for reports): source, precision, ...
    """

    def __init__(self, config, logits_fn, limits: dict, description: dict[str, Any]):
        self.config = config
        self.family = config.model.name
        self._logits_fn = logits_fn
        self.limits = limits
        self.description = description
        self._memo: dict[tuple, Any] = {}  # (num_batches, seed) -> evaluate_quality's result
        self.data: dict[str, Any] | None = None  # `resolve_data`'s report, once set
        self.trained: dict[str, Any] | None = None  # an artifact's training data record

    def use_data(self, config, data: dict[str, Any]) -> Scorer:
        """Scores on `config.data` (from `resolve_data`) from now on; `data` goes in reports."""
        self.config, self.data, self._memo = config, data, {}
        return self

    @classmethod
    def from_artifact(cls, artifact: Artifact | str) -> Scorer:
        """The scorer of an artifact (a loaded one or its directory)."""
        art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
        m = art.manifest
        desc = {"artifact": art.directory, "precision": m["precision"], "source": m["source"]}
        config = ml_collections.ConfigDict(m["config"])
        scorer = cls(config, functools.partial(art.call, "score"), art.limits, desc)
        scorer.trained = trained_data(art)
        return scorer

    @classmethod
    def from_params(cls, config, params, fp8_meta, precision: str, source: dict) -> Scorer:
        """A run's params served at `precision` (or TRAIN_PRECISION: its own policy)."""
        model = inference.serving_model(config, params, fp8_meta, precision)
        programs = inference.Programs(model, config)
        score = jax.jit(programs.score)
        desc = {"source": source, "precision": precision, "policy": str(model.policy)}
        return cls(config, functools.partial(score, programs.params), programs.limits, desc)

    @classmethod
    def from_workdir(cls, config, workdir: str, precision: str, step: int | None = None):
        params, meta, step = inference.restore_params(config, workdir, step)
        source = {"workdir": os.path.abspath(workdir), "step": step}
        return cls.from_params(config, params, meta, precision, source)

    # ----------------------------------------------------------------- evaluation protocol
    def eval_batches(self, num_batches: int | None = None):
        return evaluation.eval_batches(self.config, num_batches)

    def predict(self, params, local_batch: dict, fp8_meta=None) -> dict[str, np.ndarray]:
        """Per-example stats of one eval batch (`metrics.prediction_stats`); `params` unused."""
        del params, fp8_meta
        b = local_batch
        if self.family == "gpt":
            t = b["inputs"].shape[1]
            if "segment_ids" in b:  # packed: one document per row (segments.unpacked_logits)
                logits = segments.unpacked_logits(self._gpt_logits, b, t)
            else:
                logits = self._gpt_logits(b["inputs"])[:, :t]
            targets, weights = b["targets"], b.get("weights", np.ones(b["targets"].shape))
        elif self.family == "t5":
            t = b["decoder_inputs"].shape[1]
            if "encoder_segment_ids" in b:
                logits = segments.unpacked_logits(self._t5_logits, b, t)
            else:
                logits = self._t5_logits(b["encoder_inputs"], b["decoder_inputs"])[:, :t]
            targets = b["targets"]
            weights = b.get("weights", (targets != 0).astype(np.float32))
        else:
            logits = self._logits_fn(np.asarray(b["image"], np.float32))
            targets, weights = b["label"], np.ones(b["label"].shape, np.float32)
        stats = _prediction_stats(
            logits, np.asarray(targets, np.int32), np.asarray(weights, np.float32)
        )
        return jax.device_get(stats)

    def _gpt_logits(self, inputs) -> np.ndarray:
        t = np.shape(inputs)[1]
        padded = _pad_to(inputs, self.limits["seq_len"], "data.seq_len")
        return np.asarray(self._logits_fn(padded))[:, :t]

    def _t5_logits(self, encoder_inputs, decoder_inputs) -> np.ndarray:
        t = np.shape(decoder_inputs)[1]
        enc = _pad_to(encoder_inputs, self.limits["enc_len"], "data.enc_len")
        dec = _pad_to(decoder_inputs, self.limits["decode_len"], "data.dec_len")
        return np.asarray(self._logits_fn(enc, dec))[:, :t]


@jax.jit
def _prediction_stats(logits, targets, weights):
    return metrics_lib.prediction_stats(logits, targets, weights)


def _pad_to(x, width: int, key: str) -> np.ndarray:
    x = np.asarray(x, np.int32)
    if x.shape[1] > width:
        raise ValueError(
            f"config.{key}={x.shape[1]} is longer than the program's {width}: evaluate with the "
            f"data lengths the model was exported for."
        )
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))  # PAD = 0


def evaluate(
    scorer: Scorer,
    reference: Scorer | None = None,
    *,
    num_batches: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Quality of `scorer` on the clean and shifted eval split, and agreement with `reference`.

    Returns:
      (report, predictions): report = {"model", "examples", "clean", "shifted", and with a
      reference "reference" (its description and clean metrics) and "agreement" (per
      condition)}; predictions[condition] the per-example stats (`evaluation`).
    """
    summary, preds = _quality(scorer, num_batches, seed)
    summary = dict(summary)
    clean = summary.pop(evaluation.CLEAN)
    report: dict[str, Any] = {
        "model": scorer.description,
        "examples": float(np.sum(preds[evaluation.CLEAN]["weight"])),
        "clean": clean,
        "shifted": summary,
    }
    if scorer.data is not None:
        report["data"] = scorer.data
    if reference is not None:
        ref_summary, ref_preds = _quality(reference, num_batches, seed)
        report["reference"] = {**reference.description, "clean": ref_summary[evaluation.CLEAN],
                               "shifted": {k: v for k, v in ref_summary.items()
                                           if k != evaluation.CLEAN}}  # fmt: skip
        report["agreement"] = evaluation.agreement_with(preds, ref_preds)
        preds = {"candidate": preds, "reference": ref_preds}
    return report, preds


def _quality(scorer: Scorer, num_batches, seed):
    """`evaluation.evaluate_quality` of a scorer, computed once per (num_batches, seed): a
    reference gated against several candidates is scored once."""
    key = (num_batches, seed)
    if key not in scorer._memo:
        scorer._memo[key] = evaluation.evaluate_quality(
            scorer, None, seed=seed, num_batches=num_batches
        )
    return scorer._memo[key]


def reference_for(artifact: Artifact, reference: str | None) -> Scorer | None:
    """The FP32 reference of an artifact: `reference` (an artifact dir), else its source
    checkpoint at fp32 when that workdir is still there, else None ("none": none)."""
    if reference == "none":
        return None
    if reference:
        return Scorer.from_artifact(reference)
    source = artifact.manifest["source"]
    workdir = source.get("workdir")
    if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        log.warning("No FP32 reference: pass --reference=ARTIFACT (the source run %s is gone).",
                    workdir)  # fmt: skip
        return None
    config = ml_collections.ConfigDict(artifact.manifest["config"])
    return Scorer.from_workdir(config, workdir, "fp32", source.get("step"))


def resolve_data(config, trained: dict | None, data: str | None = None):
    """The config to measure a model on and the report of that data.

    Args:
      config: the model's config (its `data` is what it trained on, unless told otherwise).
      trained: `provenance` record of the data the model trained on (None: unknown).
      data: a prepared dataset directory to measure on instead (`--data`), knowingly.

    Returns:
      (config reading the data, {"measured", "trained", "same_as_training", "split"}).

    Raises:
      ValueError: without `data`, data other than the training data (a prepared dataset
        rewritten since, a config naming another set); with it, a dataset the model cannot read
        (another tokenizer, a vocabulary above the embedding, an empty split).
    """
    if data:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.data.name, config.data.path, config.data.mixture = "prepared", data, ""
        measured = provenance.describe(config.data)
        if not provenance.same_tokenizer(trained, measured):
            raise ValueError(
                f"--data={data} was tokenized with another tokenizer than the model's training "
                f"data ({provenance.summary(trained)}): prepare it again with that --tokenizer."
            )
        _check_measurable(config, data, trained)
    else:
        measured = provenance.describe(config.data)
        diff = provenance.compare(trained, measured)
        if diff:
            raise ValueError(
                f"{diff}: its figures would not be the model's on its own data. Restore that "
                "data (or drop the --config that names other data), or pass --data=DIR to "
                "measure on a prepared dataset knowingly (the report says so)."
            )
    same = None if trained is None else provenance.compare(trained, measured) is None
    report = {"measured": measured, "split": "eval", "trained": trained, "same_as_training": same}
    return config, report


def trained_data(artifact: Artifact) -> dict | None:
    """The record of the data an artifact's model trained on (its manifest's "data", else what
    its config says), or None."""
    m = artifact.manifest
    if isinstance(m.get("data"), dict) and "trained" in m["data"]:
        return m["data"]["trained"]
    return provenance.describe_saved(m.get("config"))


def _check_measurable(config, data: str, trained: dict | None) -> None:
    """--data against the model: its tokenizer the bundled training data's (bytes or
    data.tokenizer), its ids within the embedding, a non-empty eval split (the train split is not
    read)."""
    from bf16jax.data import mixture
    from bf16jax.data.prepared import sha256_file
    from bf16jax.data.tokenizer import tokenizer_files

    for ds, _ in mixture.dataset_sources(config.data):
        if trained is not None and trained["name"] != "prepared":
            spec = trained["tokenizer"]
            want = {} if spec == "bytes" else {
                os.path.basename(p): sha256_file(p) for p in tokenizer_files(spec)
            }  # fmt: skip
            if want != ds.tokenizer["files"]:
                raise ValueError(
                    f"--data={data} was tokenized with a {ds.tokenizer['kind']} tokenizer, the "
                    f"model with {spec}: prepare it again with the model's tokenizer."
                )
        vocab = int(config.model.vocab_size)
        if vocab < ds.tokenizer["vocab_size"] or vocab <= ds.max_token_id:
            raise ValueError(
                f"--data={data}: its tokenizer's vocabulary ({ds.tokenizer['vocab_size']}) "
                f"exceeds the model's embedding (model.vocab_size={vocab}): prepare it with the "
                "model's tokenizer."
            )
        if not ds.documents("eval"):
            raise ValueError(
                f"--data={data} has an empty eval split: prepare it with --eval_fraction=F or "
                "--eval_docs=N."
            )


def data_line(report: dict) -> str:
    """One line for a person: which data a tool measured on, and whether it is the model's."""
    what = {
        True: "the model's training data",
        False: "NOT the model's training data",
        None: "the model's training data is not recorded",
    }[report["same_as_training"]]
    return f"data: {provenance.summary(report['measured'])}, eval split ({what})"


def report_json(report: dict[str, Any]) -> str:
    """The report as one JSON document (floats as they are, keys sorted)."""
    return json.dumps(report, indent=1, sort_keys=True, default=float)
