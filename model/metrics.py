"""Names of the metrics a run reports each iteration, and which way is better.

Kept free of torch so the read-only commands (`sweep list/status/best/results`)
can validate a metric name without loading the training stack.
"""

from __future__ import annotations

# Every head's scores in heads.json (DESIGN.md, "Head scores").
SCORE_NAMES = ("previous_token", "current_token", "first_token", "duplicate_token", "induction", "copying")
# Tune metric name -> head score it summarises (the max over heads).
SUMMARY_METRICS = {
    "induction_score_max": "induction",
    "prev_token_score_max": "previous_token",
    "first_token_score_max": "first_token",
    "copying_score_max": "copying",
}

# A head is labelled induction / previous-token above these scores; the run's formed_at is when
# its best head first passes.
INDUCTION_THRESHOLD = 0.4
PREVIOUS_TOKEN_THRESHOLD = 0.4
# A head `matters` when mean-ablating it raises held-out or repeated-token loss by more (nats).
MATTERS_THRESHOLD = 0.05

# Every metric a training iteration reports (the contract of DESIGN.md).
REPORTED_METRICS = (
    "train_loss",
    "test_loss",
    "test_accuracy",
    "test_perplexity",
    "icl_score",
    "tokens_seen",
    "tokens_per_second",
    "epoch",
    "lr",
    *SUMMARY_METRICS,
    "induction_formed_at",
    "prev_token_formed_at",
)
# Reported each iteration beside the metrics: every head's scores ("layer.head" -> scores), the head history.
HEAD_HISTORY_KEY = "head_scores"

# Metrics where larger is better; every other one (losses, perplexity) ranks by min.
LARGER_IS_BETTER = frozenset({"test_accuracy", "tokens_seen", "tokens_per_second", "epoch", *SUMMARY_METRICS})


def metric_mode(metric: str) -> str:
    """`max` for scores, accuracy and throughput, `min` for losses and anything else."""
    return "max" if metric in LARGER_IS_BETTER or metric.endswith("_score_max") else "min"


COPYING_THRESHOLD = 0.7


def label_matters(document: dict, threshold: float) -> dict:
    """heads.json with the `matters` label on heads whose mean-ablation rise (held-out or
    repeated tokens) passes `threshold` nats, and off the others; `copying` only on heads that
    matter and whose OV circuit copies (a copying score past its threshold)."""
    copying = (document.get("probe") or {}).get("thresholds", {}).get("copying", COPYING_THRESHOLD)
    for head in document["heads"]:
        head["labels"] = [label for label in head["labels"] if label not in ("matters", "copying")]
        rise = head.get("ablation")
        if rise and max(rise.values()) > threshold:
            if head["scores"].get("copying", 0.0) > copying:
                head["labels"].append("copying")
            head["labels"].append("matters")
    return document


def current_labels(document: dict) -> dict:
    """A stored heads.json relabelled by today's definitions (`matters`, and `copying` only beside it), so a
    checkpoint written by an older version reads as a new one would."""
    if any("ablation" in head for head in document.get("heads", [])):
        return label_matters(document, MATTERS_THRESHOLD)
    for head in document.get("heads", []):
        head["labels"] = [label for label in head["labels"] if label != "copying"]
    return document
